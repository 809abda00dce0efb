"""Email channel: a plain-text message sent through the SMTP relay of the settings (aiosmtplib)."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import socket
import ssl
from datetime import datetime, timezone
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr

import aiosmtplib
from email_validator import EmailNotValidError, validate_email

from alerting_app.channels.errors import PermanentDeliveryError, RetryableDeliveryError
from alerting_app.channels.summary import describe, event_time, headline
from alerting_app.contracts import NotificationReady
from alerting_app.settings import Settings

log = logging.getLogger(__name__)


def email_message(notification: NotificationReady, sender: str, recipient: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ascii_address(recipient)
    message["Subject"] = one_line(headline(notification))
    # RFC 5322 3.6 requires Date, and Message-ID should be there: a relay adds neither for mail from
    # another host (Postfix's always_add_missing_headers=no), and Gmail refuses mail without a
    # Message-ID. It is the same on every attempt, so a retry after a lost reply to DATA is a copy
    # mail clients can recognise.
    message["Date"] = format_datetime(datetime.now(timezone.utc))
    message["Message-ID"] = message_id(notification.notification_id, recipient, sender)
    lines = [headline(notification), ""]
    for alert in notification.alerts:
        lines += [
            f"{alert.severity.value}  {describe(alert)}",
            f"  when:     {event_time(alert)}",
            f"  alert_id: {alert.alert_id}",
        ]
        lines += [f"  {key}: {value}" for key, value in sorted(alert.context.items())]
        lines.append("")
    if notification.truncated_alerts:
        lines += [f"... and {notification.truncated_alerts} more alerts in this group, not listed", ""]
    lines += [f"notification {notification.notification_id}", f"rules {', '.join(notification.rule_ids)}"]
    message.set_content("\n".join(lines) + "\n")
    return message


def ascii_address(address: str) -> str:
    """`address` with its domain in IDNA (`ops@xn--bcher-kva.example`) where its local part is ASCII.

    An endpoint's address is stored as email-validator normalised it, with a non-ASCII domain as
    typed (`ops@bücher.example`): sent as it is, the envelope needs a relay with SMTPUTF8 and the
    To header became an encoded word inside the address, which no mail reader takes as one.
    """
    try:
        return validate_email(address, check_deliverability=False).ascii_email or address
    except EmailNotValidError:
        return address  # as stored: the relay's answer says what is wrong with it


def message_id(notification_id: str, recipient: str, sender: str) -> str:
    """`<notification_id.recipient's hash@sender's domain>`: unique per message, stable per attempt."""
    domain = parseaddr(sender)[1].rpartition("@")[2]
    if not domain or not domain.isascii() or not all(c.isalnum() or c in ".-" for c in domain):
        domain = "alerting.invalid"
    return f"<{notification_id}.{hashlib.sha256(recipient.encode()).hexdigest()[:8]}@{domain}>"


def one_line(text: str) -> str:
    """`text` with every run of whitespace, line breaks included, as one space.

    A header may not hold a line break (EmailMessage refuses \\n, \\r, \\v, \\x85, \\u2028 and the
    other separators of str.splitlines), and an alert's source or name may.
    """
    return " ".join(text.split())


_host_name: str | None = None


async def _our_host_name() -> str:
    """This machine's name, as we greet the relay with (EHLO): looked up once per process.
    aiosmtplib looks it up for every connection (socket.getfqdn, a reverse DNS lookup on a thread of
    the default executor), where it never changes: under a slow name server each email held a
    thread for the lookup's timeout."""
    global _host_name
    if _host_name is None:
        _host_name = await asyncio.to_thread(socket.getfqdn)
    return _host_name


async def send_email(settings: Settings, recipient: str, notification: NotificationReady) -> None:
    try:
        message = email_message(notification, settings.smtp_from, recipient)
    except (ValueError, TypeError) as exc:
        # The same notification would make the same message again: not worth a retry.
        raise PermanentDeliveryError(f"the message could not be built: {type(exc).__name__}: {exc}") from None
    relay = aiosmtplib.SMTP(
        hostname=settings.smtp_host,
        port=settings.smtp_port,
        start_tls=start_tls(settings),
        # Opportunistic TLS (no setting, no login) encrypts without checking whose certificate it
        # is, as mail servers do with each other: a relay's self-signed certificate must not stop
        # mail that would otherwise go in clear.
        validate_certs=start_tls(settings) is not None,
        cert_bundle=str(settings.smtp_ssl_cafile) if settings.smtp_ssl_cafile else None,
        username=settings.smtp_user,
        password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
        timeout=settings.smtp_timeout_s,
        local_hostname=settings.smtp_helo_name or await _our_host_name(),
    )
    try:
        await _converse(relay, message, settings.smtp_timeout_s)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        # One recipient per message here; the reply the relay gave, not the exception's repr.
        refusal = min(exc.recipients, key=lambda refused: refused.code)
        if refusal.code == _CLOSING:
            raise _service_refused(refusal.code, refusal.message) from None
        if (refused := _refused_us(refusal.code, refusal.message)) is not None:
            raise _worker_refused(refusal.code, refusal.message, refused) from None
        raise _by_reply_code(refusal.code, f"SMTP {refusal.code}: {refusal.message}") from None
    except (aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPConnectResponseError) as exc:
        if exc.code == _CLOSING or isinstance(exc, aiosmtplib.SMTPConnectResponseError):
            raise _service_refused(exc.code, exc.message) from None
        # The relay refused SMTP_FROM: the same for every message until its operator fixes
        # SMTP_FROM or the relay, so retried like a relay that is down.
        raise RetryableDeliveryError(f"SMTP {exc.code}: {exc.message} (check SMTP_FROM and the relay)") from None
    except aiosmtplib.SMTPResponseException as exc:
        if exc.code == _CLOSING:
            raise _service_refused(exc.code, exc.message) from None
        if isinstance(exc, aiosmtplib.SMTPHeloError):
            # Our greeting (EHLO, then HELO) refused: nothing about this message, the same for
            # every one until its operator sets another name (SMTP_HELO_NAME) or the relay.
            raise _worker_refused(exc.code, exc.message, _GREETING) from None
        # A reply to STARTTLS or AUTH, the other commands before the message (a garbled reply, -1,
        # is none: aiosmtplib reads it before it knows whose it is).
        before_the_message = not isinstance(exc, aiosmtplib.SMTPDataError) and 400 <= exc.code < 600
        if exc.code in _RELAY_SETTINGS_REPLIES or before_the_message:
            # The relay refused our login or STARTTLS, or asks for TLS: SMTP_* settings its
            # operator can fix, not this message's fault, so it is retried like a relay that is
            # down. Before, another 5xx there (504 to an AUTH mechanism, say) failed every email for good.
            raise RetryableDeliveryError(f"SMTP {exc.code}: {exc.message} (check the SMTP_* settings)") from None
        if isinstance(exc, aiosmtplib.SMTPDataError) and (refused := _refused_us(exc.code, exc.message)) is not None:
            # DATA's reply refusing what is this worker's, not the message's (Amazon SES's unverified
            # SMTP_FROM, Gmail's unauthenticated sender): before, every email failed for good.
            raise _worker_refused(exc.code, exc.message, refused) from None
        # DATA's reply: about the message.
        raise _by_reply_code(exc.code, f"SMTP {exc.code}: {exc.message}") from None
    except TimeoutError:
        # Ours or one of aiosmtplib's per-command timeouts (SMTPTimeoutError is a TimeoutError too).
        raise RetryableDeliveryError(f"timed out after {settings.smtp_timeout_s:g}s") from None
    except aiosmtplib.SMTPConnectError as exc:
        # aiosmtplib's text names the relay's host, address and port: ours, not the tenant's, who
        # reads the reason (the delivery's last_error). The kind of trouble, and a certificate
        # check's verdict (e.g. CERTIFICATE_VERIFY_FAILED), are the tenant's; the rest goes to the log.
        log.warning("email: %s", exc)
        raise RetryableDeliveryError(f"could not connect to the SMTP relay: {_kind_and_verdict(exc.__cause__ or exc)}"
                                     " (the platform's trouble, not the endpoint's)") from None
    except ssl.SSLError as exc:
        # The TLS handshake after STARTTLS: OpenSSL's text names the relay ("Hostname mismatch,
        # certificate is not valid for 'smtp.internal'", or its IP address), ours, not the
        # tenant's, who reads the reason. The kind and the verdict are the tenant's; the rest is logged.
        log.warning("email: TLS with the SMTP relay failed: %s", exc)
        raise RetryableDeliveryError(f"TLS with the SMTP relay failed: {_kind_and_verdict(exc)}"
                                     " (the platform's trouble, not the endpoint's)") from None
    except (aiosmtplib.SMTPException, OSError) as exc:
        # Connection refused or lost, timeouts, and a relay that lacks what the settings require
        # (STARTTLS): the relay's trouble, not the message's, and one its operator can fix.
        raise RetryableDeliveryError(f"{type(exc).__name__}: {exc}") from None
    _say_goodbye(relay, settings.delivery_endpoint_concurrency)


def _kind_and_verdict(exc: BaseException) -> str:
    """What a tenant may read of the relay's trouble: the exception's kind, and an SSL error's
    verdict (`SSLCertVerificationError CERTIFICATE_VERIFY_FAILED`), without its text, which names
    the relay."""
    verdict = getattr(exc, "reason", None)
    return f"{type(exc).__name__}{f' {verdict}' if isinstance(verdict, str) else ''}"


async def _converse(relay: aiosmtplib.SMTP, message: EmailMessage, timeout_s: float) -> None:
    """Connect and send `message`, within `timeout_s` in all; after a failure the connection is
    closed without QUIT, nothing more asked of a relay that failed.

    aiosmtplib's `timeout` bounds each command; SMTP_TIMEOUT_S is for the whole conversation, so a
    relay answering every command just in time cannot hold a delivery for many times it. Not
    aiosmtplib.send: its `async with` sends QUIT after any failure but a lost connection, our
    timeout included, and waits for the answer (a hanging relay held a send for twice
    SMTP_TIMEOUT_S); and its QUIT after the message counted within our timeout (a relay slow to
    answer it made a delivered message a timeout, and the delivery was retried).
    """
    try:
        async with asyncio.timeout(timeout_s):
            await relay.connect()
            await relay.send_message(message)
    except BaseException:
        relay.close()
        raise


# How long the QUIT after a message is waited for. The message is the relay's once it answered DATA
# with 250: the goodbye is said apart from the send, which is over, and whatever the relay answers
# to it (or a worker stopping meanwhile) changes nothing.
_GOODBYE_S = 1.0
_goodbyes: set[asyncio.Task] = set()  # referenced while they run: asyncio keeps only weak references


def _say_goodbye(relay: aiosmtplib.SMTP, most: int) -> None:
    """QUIT in the background, while fewer than `most` (the relay's send slots) are under way; else
    close at once. A goodbye holds a connection to the relay for up to _GOODBYE_S after its send
    gave up its slot: unbounded, a relay slow to answer QUIT held a connection per email sent in
    that time (hundreds, with EMAIL_RATE_LIMIT_PER_S=0), past any connection limit it has."""
    if len(_goodbyes) >= most:
        relay.close()  # RFC 5321 asks for QUIT, but a relay takes a closed connection as its end too
        return
    goodbye = asyncio.ensure_future(_goodbye(relay))
    _goodbyes.add(goodbye)
    goodbye.add_done_callback(_goodbyes.discard)


async def _goodbye(relay: aiosmtplib.SMTP) -> None:
    try:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_GOODBYE_S):
                await relay.quit()
    finally:
        relay.close()


# RFC 4954 and 3207: 530 authentication (or STARTTLS) required, 534 mechanism too weak, 535
# credentials invalid, 538 encryption required for the mechanism.
_RELAY_SETTINGS_REPLIES = frozenset({530, 534, 535, 538})


def start_tls(settings: Settings) -> bool | None:
    """aiosmtplib's `start_tls`: None upgrades when the relay offers STARTTLS (then the certificate
    is not checked); True requires it, and the relay's certificate must be valid for SMTP_HOST
    (against SMTP_SSL_CAFILE, else the system's CAs)."""
    if settings.smtp_starttls is None and settings.smtp_user is not None:
        return True  # a password is never sent in clear unless SMTP_STARTTLS=false says so
    return settings.smtp_starttls


# 421: the relay closes the conversation, whatever the command (RFC 5321 4.2.3).
_CLOSING = 421


def _service_refused(code: int, message: str) -> RetryableDeliveryError:
    """The relay refusing us service, in its greeting or with a 421 to any command: its own state,
    not this message's, and retried like a relay that is down. Its text goes to the worker's log:
    it names the relay (RFC 5321's "421 <domain> Service not available", Postfix's "421 4.7.0 <its
    name> Error: too many connections from <our worker's address>"), ours, not the tenant's, who
    reads the reason."""
    log.warning("email: the SMTP relay refused service: %s %s", code, message)
    return RetryableDeliveryError(f"SMTP {code}: the SMTP relay refused service (the platform's trouble,"
                                  " not the endpoint's)")


# A relay refuses this worker, not the recipient, at RCPT in words that read like the recipient's:
# Postfix applies its restrictions on the client, its greeting and the sender there
# (smtpd_delay_reject, the default), and other relays refuse relaying there. Each is about this
# worker, the same for every email: read as the recipient's, a 5xx failed every email for good. A
# few relays refuse what is ours only once they have the message (DATA): Amazon SES an unverified
# SMTP_FROM, Exchange a sender our login may not send as, Gmail a sender without SPF or DKIM.
# What is recognised: the phrases of _REFUSED_US, each the documented or logged reply of a widely
# deployed relay (the source is named at each), and the enhanced status codes of
# _REFUSED_US_BY_STATUS. Not X.7.x as a whole (RFC 3463's security or policy status): relays
# answer the recipient's own policy with it too, e.g. Postfix's check_recipient_access ("554 5.7.1
# <ops@...>: Recipient address rejected: Access denied") and Exchange's delivery restrictions ("550
# 5.7.1 RESOLVER.RST.NotAuthorized; not authorized", "550 5.7.133
# RESOLVER.RST.SenderNotAuthenticatedForGroup; authentication required; ... sending to this
# group"), which stay the recipient's; so no phrase as wide as "authentication required" either.
_GREETING = "its greeting (EHLO: check SMTP_HELO_NAME, a fully-qualified name the relay takes)"
_ADDRESS = "this worker's address"
_SENDER = "the sender (check SMTP_FROM)"
_SENDER_AUTHENTICATION = "the sender's authentication (SPF, DKIM or DMARC of SMTP_FROM's domain)"
_UNVERIFIED = "an address its account has not verified (SMTP_FROM, or any recipient while in SES's sandbox)"
_RELAYING = "relaying for this worker"
_LOGIN = "this worker without a login or TLS (check SMTP_USER, SMTP_PASSWORD and SMTP_STARTTLS)"
_REFUSED_US = tuple((re.compile(phrase, re.IGNORECASE), refused) for phrase, refused in (
    # Postfix: "504 5.5.2 <name>: Helo command rejected: need fully-qualified hostname"
    # (reject_non_fqdn_helo_hostname), "450 4.7.1 Client host rejected: cannot find your hostname,
    # [10.0.3.7]", "554 5.7.1 Service unavailable; Client host [10.0.3.7] blocked using
    # zen.spamhaus.org", "553 5.1.8 <alerts@...>: Sender address rejected: Domain not found", "554
    # 5.7.1 <ops@...>: Relay access denied" (reject_unauth_destination). Exchange Online's "550 5.7.64
    # TenantAttribution; Relay Access Denied" too (Microsoft: "550 5.7.64 Relay Access Denied ATTR36").
    (r"\bHelo command rejected\b", _GREETING),
    (r"\bClient host rejected\b|\bClient host \[[^]]*\] blocked\b", _ADDRESS),
    (r"\bSender address rejected\b", _SENDER),
    (r"\bRelay access denied\b", _RELAYING),
    # Postfix with pypolicyd-spf, which Postfix reports as the recipient's restriction: "550 5.7.1
    # <ops@...>: Recipient address rejected: Message rejected due to: SPF fail - not authorized"
    # (newer versions say 5.7.23, which _REFUSED_US_BY_STATUS knows).
    (r"\bMessage rejected due to: SPF fail\b", _SENDER_AUTHENTICATION),
    # Exim's default configuration (src/configure.default: "require message = relay not permitted";
    # Exim's test suite: "550 relay not permitted"), "Relaying not permitted" in others' ACLs; its
    # "require verify = sender": "550-Verification failed for <alerts@...>", "550-Unrouteable
    # address", "550 Sender verify failed".
    (r"\brelay(?:ing)? not permitted\b", _RELAYING),
    (r"\bSender verify failed\b", _SENDER),
    # Sendmail's check_rcpt: "550 5.7.1 <ops@...>... Relaying denied", "... Relaying denied. Proper
    # authentication required.", "... Relaying denied. IP name lookup failed [10.0.3.7]".
    (r"\bRelaying denied\b", _RELAYING),
    # qmail's rcpthosts: "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)".
    (r"\bisn't in my list of allowed rcpthosts\b", _RELAYING),
    # Microsoft Exchange ("Allow anonymous relay on Exchange servers": RCPT TO answered "550 5.7.1
    # Unable to relay") and Exchange Online ("550 5.7.54 SMTP; Unable to relay recipient in
    # non-accepted domain"); Exchange's SmtpResponse.SendAsDenied, "550 5.7.1 Client does not have
    # permission to send as this sender" (and AnonymousSendAsDenied: "Anonymous client does not ..."),
    # Exchange Online's "550 5.7.60 SMTP; Client does not have permissions to send as this sender".
    (r"\bUnable to relay\b", _RELAYING),
    (r"\bdoes not have permissions? to send as this sender\b", _SENDER),
    # Google Workspace's SMTP relay and Gmail (Google's SMTP error reference, and its "SMTP relay"
    # help): "550 5.7.0 Mail relay denied [<ip>]. Invalid credentials for relay for one of the
    # domains in: ...", "550 5.7.1 Invalid credentials for relay [<ip>]. The IP address you've
    # registered in your Workspace SMTP Relay service doesn't match ...", "555 5.7.1 Authentication
    # required for relay", "550 5.7.0 Mail Sending denied" (the sender not in the Workspace domain),
    # "550 5.7.1 The IP you're using to send mail is not authorized to send email directly to our
    # servers", "550 5.7.1 Unauthenticated email is not accepted from this domain".
    (r"\bMail relay denied\b|\bInvalid credentials for relay\b|\bAuthentication required for relay\b", _RELAYING),
    (r"\bMail Sending denied\b", _SENDER),
    (r"\bnot authorized to send email directly to our servers\b", _ADDRESS),
    (r"\bUnauthenticated email is not accepted from this domain\b", _SENDER_AUTHENTICATION),
    # Amazon SES refuses an identity its account has not verified once it has the message ("SMTP
    # error from remote mail server after end of data: 554 Message rejected: Email address is not
    # verified. The following identities failed the check in region EU-WEST-1: ..."): SMTP_FROM,
    # and in its sandbox the recipient too, which is the platform's account, not the endpoint.
    (r"\bEmail address is not verified\b", _UNVERIFIED),
    # SendGrid ("SMTP Errors and Troubleshooting"): "403 You are not authorized to send from that
    # email address", SMTP_FROM not a verified Sender Identity.
    (r"\bnot authorized to send from that email address\b", _SENDER),
))
# Enhanced status codes (RFC 3463, and the IANA registry) whose subject is the sender or this
# worker, never the recipient: X.1.7 bad sender's mailbox address syntax, X.1.8 bad sender's
# system address (RFC 3463); X.7.20-22 no passing, acceptable or author-matched DKIM signature,
# X.7.23 SPF validation failed, X.7.24 SPF validation error, X.7.25 reverse DNS validation failed
# (of the SMTP client's address), X.7.26 multiple authentication checks failed (RFC 7372); X.7.27
# sender address has null MX (RFC 7505). Postfix's "Recipient address rejected" from a policy
# service names only where the restriction sat: "550 5.7.23 <ops@...>: Recipient address
# rejected: Message rejected due to: SPF fail - not authorized" (pypolicyd-spf).
_REFUSED_US_BY_STATUS = {
    "1.7": _SENDER, "1.8": _SENDER, "7.27": _SENDER, "7.25": _ADDRESS,
    **dict.fromkeys(("7.20", "7.21", "7.22", "7.23", "7.24", "7.26"), _SENDER_AUTHENTICATION),
}
_ENHANCED_STATUS = re.compile(r"\s*[245]\.(\d{1,3}\.\d{1,3})(?![\d.])")
# Postfix's address verification (reject_unverified_recipient) refuses a recipient quoting what
# the recipient's own server told it: "550 5.1.1 <ops@...>: Recipient address rejected:
# undeliverable address: host mx...[...] said: 554 5.7.1 <ops@...>: Relay access denied (in reply
# to RCPT TO command)". That server refused that address, and the relay itself would bounce the
# message: the recipient's. What follows "host ... said:" is not the relay's own words.
_QUOTED_REPLY = re.compile(r"\bhost \S+ said:", re.IGNORECASE)
# RFC 4954 6 ("530 5.7.0 Authentication required") and RFC 3207 4 ("530 Must issue a STARTTLS
# command first"), answers to any command a relay takes only with a login or TLS, RCPT among them:
# "530 SMTP authentication is required. (in reply to RCPT TO command)"; Exchange Online's "530
# 5.7.57 Client not authenticated to send mail". The relay settings, not the recipient.
_LOGIN_REQUIRED = 530


def _refused_us(code: int, reply: str) -> str | None:
    """What of this worker a reply to RCPT or DATA says the relay refused; None: not this worker,
    the recipient or the message. The reply's own enhanced status code, if one of
    _REFUSED_US_BY_STATUS, else the first phrase of _REFUSED_US in the relay's own words."""
    if code == _LOGIN_REQUIRED:
        return _LOGIN
    own_words = _QUOTED_REPLY.split(reply, maxsplit=1)[0]
    if (status := _ENHANCED_STATUS.match(own_words)) and status[1] in _REFUSED_US_BY_STATUS:
        return _REFUSED_US_BY_STATUS[status[1]]
    found = [(match.start(), refused) for pattern, refused in _REFUSED_US if (match := pattern.search(own_words))]
    return min(found, key=lambda at: at[0], default=(0, None))[1]


def _worker_refused(code: int, message: str, refused: str) -> RetryableDeliveryError:
    """The relay refusing this worker (`refused`: what of it), not the message: retried like a
    relay that is down, every email failing until its operator fixes it. The reply goes to the
    worker's log: it names this worker (its host name, its address), ours, not the tenant's, who
    reads the reason."""
    log.warning("email: the SMTP relay refused %s: %s %s", refused, code, message)
    return RetryableDeliveryError(f"SMTP {code}: the SMTP relay refused {refused}"
                                  " (the platform's trouble, not the endpoint's)")


def _by_reply_code(code: int, reason: str) -> Exception:
    # SMTP replies 4xx for transient conditions and 5xx for permanent ones (RFC 5321 4.2.1). Anything
    # else is no verdict on the message: aiosmtplib's -1 for a reply line it could not read (too long,
    # no code), a relay's trouble like a lost connection.
    if 500 <= code < 600:
        return PermanentDeliveryError(reason)
    return RetryableDeliveryError(reason)
