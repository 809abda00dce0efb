"""The email channel against a real SMTP server (aiosmtpd) started by the test."""
from __future__ import annotations

import asyncio
import socket
import ssl
import time

import pytest
import trustme
from aiosmtplib.email import flatten_message
from pydantic import SecretStr

from alerting_app.channels.email import email_message, send_email
from alerting_app.channels.errors import PermanentDeliveryError, RetryableDeliveryError
from alerting_app.contracts import Alert, NotificationReady
from alerting_app.embedded import free_port
from alerting_app.settings import Settings
from delivery_receivers import SmtpServer


def notification(*alerts: Alert) -> NotificationReady:
    return NotificationReady(notification_id="6f1c2a34-0000-4000-8000-000000000002",
                             client_id="0c3f5d6e-0000-4000-8000-000000000003",
                             alerts=list(alerts) or [Alert(alert_id="a-1", event_ts=1_700_000_000, severity="HIGH",
                                                           source="payments", name="CheckoutLatency",
                                                           context={"region": "eu-west-1"})],
                             rule_ids=["1d2e3f40-0000-4000-8000-000000000004"])


def smtp_settings(port: int) -> Settings:
    return Settings(smtp_host="127.0.0.1", smtp_port=port, smtp_from="alerts@alerting.example",
                    smtp_timeout_s=5)


async def test_email_arrives_with_the_alert_in_subject_and_plain_text_body():
    with SmtpServer() as smtp:
        await send_email(smtp_settings(smtp.port), "oncall@example.com", notification())

        [message] = smtp.messages
        assert message["Subject"] == "[HIGH] payments: CheckoutLatency"
        assert (message["From"], message["To"]) == ("alerts@alerting.example", "oncall@example.com")
        assert message.get_content_type() == "text/plain"
        body = message.get_content()
        for expected in ("HIGH  payments: CheckoutLatency", "when:     2023-11-14 22:13:20 UTC",
                         "alert_id: a-1", "region: eu-west-1",
                         "notification 6f1c2a34-0000-4000-8000-000000000002"):
            assert expected in body


async def test_a_grouped_notification_lists_every_alert_and_counts_them_in_the_subject():
    alerts = [Alert(alert_id=f"a-{n}", event_ts=1_700_000_000, severity=severity, source="search", name=f"Slow{n}")
              for n, severity in enumerate(["LOW", "CRITICAL"], start=1)]
    with SmtpServer() as smtp:
        await send_email(smtp_settings(smtp.port), "oncall@example.com", notification(*alerts))

        [message] = smtp.messages
        assert message["Subject"] == "[CRITICAL] 2 alerts: search: Slow1, +1 more"
        body = message.get_content()
        assert "LOW  search: Slow1" in body and "CRITICAL  search: Slow2" in body


def test_a_truncated_group_counts_its_unlisted_alerts_in_subject_and_body():
    alerts = [Alert(alert_id=f"a-{n}", event_ts=1_700_000_000, severity="HIGH", source="search", name=f"Slow{n}")
              for n in range(1, 3)]
    grouped = notification(*alerts).model_copy(update={"truncated_alerts": 30})

    message = email_message(grouped, "alerts@example.com", "oncall@example.com")

    assert message["Subject"] == "[HIGH] 32 alerts: search: Slow1, +31 more"
    assert "... and 30 more alerts in this group, not listed" in message.get_content()


@pytest.fixture
def relay_tls(tmp_path, monkeypatch) -> ssl.SSLContext:
    """A relay's TLS context, from a throwaway CA that this process's TLS clients trust: OpenSSL
    reads SSL_CERT_FILE whenever a default context is made, as aiosmtplib makes one per send."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def untrusted_relay_tls(tmp_path) -> tuple[ssl.SSLContext, str]:
    """A relay's TLS context from a CA nobody here trusts (a self-signed relay), and that CA's file."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "private-ca.pem")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context, str(tmp_path / "private-ca.pem")


def with_login(settings: Settings, password: str = "s3cret", **changes) -> Settings:
    return settings.model_copy(update={"smtp_user": "alerts", "smtp_password": SecretStr(password), **changes})


async def test_mail_goes_over_tls_whenever_the_relay_offers_starttls(relay_tls):
    with SmtpServer(starttls=relay_tls) as smtp:
        await send_email(smtp_settings(smtp.port), "oncall@example.com", notification())
        assert smtp.over_tls == [True]


async def test_opportunistic_tls_takes_a_relays_certificate_nobody_here_trusts(untrusted_relay_tls):
    # As mail servers do with each other: encrypted rather than in clear, whoever the relay is.
    context, _ = untrusted_relay_tls
    with SmtpServer(starttls=context) as smtp:
        await send_email(smtp_settings(smtp.port), "oncall@example.com", notification())
        assert smtp.over_tls == [True]


async def test_a_login_needs_the_relays_certificate_to_check_out_against_smtp_ssl_cafile(untrusted_relay_tls):
    context, private_ca = untrusted_relay_tls
    with SmtpServer(logins={"alerts": "s3cret"}, starttls=context) as smtp:
        with pytest.raises(RetryableDeliveryError, match="CERTIFICATE_VERIFY_FAILED"):
            await send_email(with_login(smtp_settings(smtp.port)), "oncall@example.com", notification())
        assert smtp.logged_in == []

        await send_email(with_login(smtp_settings(smtp.port), smtp_ssl_cafile=private_ca), "oncall@example.com",
                         notification())
        assert smtp.logged_in == ["alerts"] and smtp.over_tls == [True]


def test_an_smtp_ca_file_that_is_not_one_stops_start_up_naming_it(tmp_path, monkeypatch):
    (tmp_path / "not-a-ca.pem").write_text("not a certificate")
    monkeypatch.setenv("SMTP_SSL_CAFILE", str(tmp_path / "not-a-ca.pem"))
    with pytest.raises(ValueError, match="SMTP_SSL_CAFILE"):
        Settings()


async def test_smtp_starttls_false_keeps_the_conversation_in_clear(relay_tls):
    with SmtpServer(starttls=relay_tls) as smtp:
        settings = smtp_settings(smtp.port).model_copy(update={"smtp_starttls": False})
        await send_email(settings, "oncall@example.com", notification())
        assert smtp.over_tls == [False]


async def test_with_smtp_user_and_password_the_relay_is_logged_in_to_over_tls(relay_tls):
    with SmtpServer(logins={"alerts": "s3cret"}, starttls=relay_tls) as smtp:
        await send_email(with_login(smtp_settings(smtp.port)), "oncall@example.com", notification())
        assert smtp.logged_in == ["alerts"] and smtp.over_tls == [True]


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # a relay without TLS
async def test_a_password_is_sent_in_clear_only_when_smtp_starttls_is_false():
    with SmtpServer(logins={"alerts": "s3cret"}) as smtp:
        with pytest.raises(RetryableDeliveryError, match="STARTTLS"):
            await send_email(with_login(smtp_settings(smtp.port)), "oncall@example.com", notification())
        assert smtp.logged_in == [] and smtp.messages == []

        await send_email(with_login(smtp_settings(smtp.port), smtp_starttls=False), "oncall@example.com",
                         notification())
        assert smtp.logged_in == ["alerts"] and smtp.over_tls == [False]


async def test_a_refused_login_is_retried_and_names_the_settings(relay_tls):
    # The relay's operator or ours can fix a login; failing the notification for good would not.
    with SmtpServer(logins={"alerts": "s3cret"}, starttls=relay_tls) as smtp:
        with pytest.raises(RetryableDeliveryError, match=r"SMTP 535: .*check the SMTP_\* settings"):
            await send_email(with_login(smtp_settings(smtp.port), password="wrong"), "oncall@example.com",
                             notification())
        assert smtp.messages == []


def test_smtp_starttls_unset_or_empty_is_opportunistic(monkeypatch):
    monkeypatch.setenv("SMTP_STARTTLS", "")
    assert Settings().smtp_starttls is None
    monkeypatch.setenv("SMTP_STARTTLS", "maybe")
    with pytest.raises(ValueError, match="smtp_starttls"):
        Settings()


def test_empty_smtp_user_and_password_are_no_login(monkeypatch):
    """SMTP_USER= and SMTP_PASSWORD= (as a compose file or task definition writes "unset") are no
    login at all: a login with empty credentials fails at every relay that takes mail without one."""
    monkeypatch.setenv("SMTP_USER", "")
    monkeypatch.setenv("SMTP_PASSWORD", "")
    settings = Settings()
    assert (settings.smtp_user, settings.smtp_password) == (None, None)


def test_the_smtp_password_is_not_shown_with_the_settings():
    settings = Settings(smtp_user="alerts", smtp_password="s3cret")
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())


async def test_a_recipient_refused_for_good_is_permanent():
    with SmtpServer() as smtp:
        smtp.refuse("gone@example.com", "550 5.1.1 no such user")
        with pytest.raises(PermanentDeliveryError, match="no such user"):
            await send_email(smtp_settings(smtp.port), "gone@example.com", notification())


async def test_a_recipient_refused_for_now_is_retryable():
    with SmtpServer() as smtp:
        smtp.refuse("busy@example.com", "451 4.3.0 try again later")
        with pytest.raises(RetryableDeliveryError, match="try again later"):
            await send_email(smtp_settings(smtp.port), "busy@example.com", notification())


async def test_a_relay_refusing_smtp_from_for_good_is_retried_and_names_the_setting():
    # 553 is permanent for that sender, but the sender is our setting, the same for every message:
    # failing each one for good would lose them all until the operator fixes it.
    with SmtpServer() as smtp:
        smtp.refuse("alerts@alerting.example", "553 5.7.1 sender address rejected")
        with pytest.raises(RetryableDeliveryError, match=r"SMTP 553: .*sender address rejected.*check SMTP_FROM"):
            await send_email(smtp_settings(smtp.port), "oncall@example.com", notification())


@pytest.mark.parametrize("greeting", [b"554 5.3.2 relay.internal no SMTP service here",
                                      b"421 relay.internal Service not available, closing transmission channel"])
async def test_a_relay_refusing_service_in_its_greeting_is_retried_without_naming_it_to_the_tenant(greeting,
                                                                                                 caplog):
    # A refusal in the greeting is about the relay, ours, and its text names it (RFC 5321's
    # "421 <domain> Service not available"): before, it was the delivery's last_error as it came.
    async def refuse_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting + b"\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse_service, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(RetryableDeliveryError) as failure:
            await send_email(smtp_settings(port), "oncall@example.com", notification())

    code = greeting[:3].decode()
    assert str(failure.value) == (f"SMTP {code}: the SMTP relay refused service"
                                  " (the platform's trouble, not the endpoint's)")
    assert "relay.internal" in caplog.text  # the operator's log has the whole reply


async def test_a_relay_closing_the_conversation_at_any_command_is_retried_without_naming_it_to_the_tenant(caplog):
    # Postfix's answer to a worker over its connection limit: "421 4.7.0 <its name> Error: too many
    # connections from <our worker's address>". Before, it read as a refusal of SMTP_FROM, quoted.
    with SmtpServer() as smtp:
        smtp.refuse("alerts@alerting.example", "421 4.7.0 relay.internal Error: too many connections from 10.0.3.7")
        with pytest.raises(RetryableDeliveryError) as failure:
            await send_email(smtp_settings(smtp.port), "oncall@example.com", notification())

    assert str(failure.value) == "SMTP 421: the SMTP relay refused service (the platform's trouble, not the endpoint's)"
    assert "relay.internal" in caplog.text and "10.0.3.7" in caplog.text


REFUSED_ITS_GREETING = ("the SMTP relay refused its greeting (EHLO: check SMTP_HELO_NAME, a fully-qualified name"
                        " the relay takes) (the platform's trouble, not the endpoint's)")


async def test_a_relay_refusing_our_helo_name_at_rcpt_retries_naming_smtp_helo_name_not_our_host(caplog):
    # Postfix's reject_non_fqdn_helo_hostname refuses at RCPT (smtpd_delay_reject), in a reply
    # that reads like the recipient's: "504 5.5.2 <name>: Helo command rejected: need
    # fully-qualified hostname". A container's name is often a bare id: before, every email failed
    # for good, its reason quoting our host's name to the tenant. It is the worker's greeting, the
    # same for every email: retried, until the operator sets SMTP_HELO_NAME.
    with SmtpServer() as smtp:
        smtp.require_fqdn_helo()
        settings = smtp_settings(smtp.port)
        with pytest.raises(RetryableDeliveryError) as failure:
            await send_email(settings.model_copy(update={"smtp_helo_name": "c0ffee42"}), "oncall@example.com",
                             notification())
        assert str(failure.value) == f"SMTP 504: {REFUSED_ITS_GREETING}"
        assert "<c0ffee42>: Helo command rejected" in caplog.text  # the operator's log has the whole reply

        await send_email(settings.model_copy(update={"smtp_helo_name": "c0ffee42.alerting.example"}),
                         "oncall@example.com", notification())
        assert len(smtp.messages) == 1


@pytest.mark.parametrize("reply", ["550 5.7.1 <c0ffee42>: go away", "450 4.7.1 <c0ffee42>: try again later"],
                         ids=["5xx", "4xx"])
async def test_a_relay_refusing_our_greeting_retries_without_naming_our_host(reply, caplog):
    # EHLO refused, and HELO after it: the worker's greeting, not the message. Before, a 5xx failed
    # every email for good, and either reply was the tenant's reason as it came.
    with SmtpServer() as smtp:
        smtp.refuse_greetings(reply)
        with pytest.raises(RetryableDeliveryError) as failure:
            await send_email(smtp_settings(smtp.port), "oncall@example.com", notification())
    assert str(failure.value) == f"SMTP {reply[:3]}: {REFUSED_ITS_GREETING}"
    assert reply in caplog.text


@pytest.mark.parametrize(("reply", "refused"), [
    ("450 4.7.1 Client host rejected: cannot find your hostname, [10.0.3.7]", "this worker's address"),
    ("554 5.7.1 Service unavailable; Client host [10.0.3.7] blocked using zen.spamhaus.org",
     "this worker's address"),
    ("553 5.1.8 <alerts@alerting.example>: Sender address rejected: Domain not found",
     "the sender (check SMTP_FROM)"),
    ("554 5.7.1 <oncall@example.com>: Relay access denied", "relaying for this worker"),
], ids=["client-unknown", "client-blocklisted", "sender-domain", "relay-denied"])
async def test_a_postfix_restriction_on_this_worker_at_rcpt_is_retried_as_the_platforms_trouble(reply, refused,
                                                                                               caplog):
    # Postfix's other restrictions on the client and the sender answer at RCPT too, naming which
    # refused: about this worker, the same for every email, not the recipient's.
    with SmtpServer() as smtp:
        smtp.refuse("oncall@example.com", reply)
        with pytest.raises(RetryableDeliveryError) as failure:
            await send_email(smtp_settings(smtp.port), "oncall@example.com", notification())
    assert str(failure.value) == (f"SMTP {reply[:3]}: the SMTP relay refused {refused}"
                                  " (the platform's trouble, not the endpoint's)")
    assert reply in caplog.text


@pytest.mark.parametrize("reply", [
    "550 5.1.1 <oncall@example.com>: Recipient address rejected: undeliverable address: host"
    " mx.example.com[192.0.2.1] said: 554 5.7.1 <oncall@example.com>: Relay access denied"
    " (in reply to RCPT TO command)",
    "550 5.1.1 <oncall@example.com>: Recipient address rejected: undeliverable address: host"
    " mx.example.com[192.0.2.1] said: 550 5.7.1 Client host rejected: cannot find your hostname"
    " (in reply to RCPT TO command)",
], ids=["quoting-relay-denied", "quoting-client-rejected"])
async def test_a_recipient_refused_by_its_own_mail_server_fails_though_the_reply_quotes_a_restriction(reply):
    # Postfix's address verification (reject_unverified_recipient) refuses the recipient quoting
    # what the recipient's own mail server told the relay: its verdict, "Recipient address
    # rejected", comes first. That server's refusal is about that address, not this worker: the
    # relay itself would bounce the message. Read as ours, it was retried for minutes.
    with SmtpServer() as smtp:
        smtp.refuse("oncall@example.com", reply)
        with pytest.raises(PermanentDeliveryError, match="Recipient address rejected"):
            await send_email(smtp_settings(smtp.port), "oncall@example.com", notification())


async def test_a_sender_refused_by_address_verification_is_retried_though_the_reply_quotes_a_recipient(caplog):
    # reject_unverified_sender: the relay asked SMTP_FROM's domain, whose server answered about a
    # recipient (the relay's probe of our sender). The relay's verdict, first, is on the sender.
    reply = ("550 5.1.7 <alerts@alerting.example>: Sender address rejected: undeliverable address: host"
             " mx.alerting.example[192.0.2.2] said: 550 5.1.1 <alerts@alerting.example>: Recipient address"
             " rejected: User unknown (in reply to RCPT TO command)")
    with SmtpServer() as smtp:
        smtp.refuse("oncall@example.com", reply)
        with pytest.raises(RetryableDeliveryError, match=r"refused the sender \(check SMTP_FROM\)"):
            await send_email(smtp_settings(smtp.port), "oncall@example.com", notification())
    assert reply in caplog.text


def refused_us(code: str, refused: str) -> str:
    return f"SMTP {code}: the SMTP relay refused {refused} (the platform's trouble, not the endpoint's)"


RELAYING = "relaying for this worker"
SENDER = "the sender (check SMTP_FROM)"
SENDER_AUTHENTICATION = "the sender's authentication (SPF, DKIM or DMARC of SMTP_FROM's domain)"
LOGIN = "this worker without a login or TLS (check SMTP_USER, SMTP_PASSWORD and SMTP_STARTTLS)"


@pytest.mark.parametrize(("reply", "refused"), [
    # Exim's default configuration (src/configure.default, "relay not permitted"), and its sender
    # verification (Exim's test suite: "rejected RCPT <...>: Sender verify failed"; a bounce:
    # "550-Verification failed for <...> 550-Unrouteable address 550 Sender verify failed").
    ("550 relay not permitted", RELAYING),
    ("550-Verification failed for <alerts@alerting.example>\r\n550-Unrouteable address\r\n550 Sender verify failed",
     SENDER),
    # Sendmail's check_rcpt (a log: "reject=550 5.7.1 ...... Relaying denied. IP name lookup failed").
    ("550 5.7.1 <oncall@example.com>... Relaying denied", RELAYING),
    ("550 5.7.1 <oncall@example.com>... Relaying denied. Proper authentication required.", RELAYING),
    # qmail's rcpthosts, as an Exim bounce quotes it.
    ("553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)", RELAYING),
    # Microsoft: "Allow anonymous relay on Exchange servers" (RCPT TO answered "550 5.7.1 Unable to
    # relay"), Exchange Online's 5.7.54 and its "550 5.7.64 Relay Access Denied ATTR36".
    ("550 5.7.1 Unable to relay", RELAYING),
    ("550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain", RELAYING),
    ("550 5.7.64 TenantAttribution; Relay Access Denied", RELAYING),
    # 530 to RCPT: RFC 4954 6 and RFC 3207 4 (to any command); Exchange Online's 5.7.57 (logged
    # "in reply to MAIL FROM", the same at RCPT); a relay's "530 SMTP authentication is required.
    # (in reply to RCPT TO command)".
    ("530 5.7.57 Client not authenticated to send mail.", LOGIN),
    ("530 5.7.0 Must issue a STARTTLS command first.", LOGIN),
    ("530 SMTP authentication is required.", LOGIN),
    # Google Workspace's SMTP relay (Google's SMTP error reference and relay help).
    ("550 5.7.0 Mail relay denied [10.0.3.7]. Invalid credentials for relay for one of the domains in:"
     " alerting.example", RELAYING),
    ("550 5.7.1 Invalid credentials for relay [10.0.3.7]. The IP address you've registered in your Workspace SMTP"
     " Relay service doesn't match domain of the account this email is being sent from.", RELAYING),
    ("555 5.7.1 Authentication required for relay", RELAYING),
    ("550 5.7.0 Mail Sending denied", SENDER),
    ("550 5.7.1 The IP you're using to send mail is not authorized to send email directly to our servers.",
     "this worker's address"),
    # Postfix with pypolicyd-spf, which Postfix files under the recipient's restrictions: its
    # wording in a real log, with 5.7.23 (RFC 7372's SPF validation failed) and, older, 5.7.1.
    ("550 5.7.23 <oncall@example.com>: Recipient address rejected: Message rejected due to: SPF fail - not"
     " authorized.", SENDER_AUTHENTICATION),
    ("550 5.7.1 <oncall@example.com>: Recipient address rejected: Message rejected due to: SPF fail - not"
     " authorized. Please see http://www.openspf.org/Why?s=mfrom;id=alerts@alerting.example;ip=10.0.3.7",
     SENDER_AUTHENTICATION),
    # Postfix refusing to relay, filed under the recipient's restrictions (a real log: "554 5.7.1
    # <...>: Recipient address rejected: Relay access denied").
    ("554 5.7.1 <oncall@example.com>: Recipient address rejected: Relay access denied", RELAYING),
    # Enhanced status codes whose subject is this worker or the sender, whatever the words: RFC
    # 7372's X.7.25 (its text: "Reverse DNS validation failed"), RFC 7505's X.7.27, RFC 3463's X.1.8
    # (bad sender's system address; Sendmail's check_mail, as logged: "553 5.1.8 <...>... Domain of
    # sender address ... does not exist").
    ("550 5.7.25 Reverse DNS validation failed.", "this worker's address"),
    ("550 5.7.27 Sender address has null MX", SENDER),
    ("553 5.1.8 <alerts@alerting.example>... Domain of sender address alerts@alerting.example does not exist",
     SENDER),
    # SendGrid ("SMTP Errors and Troubleshooting"): SMTP_FROM not a verified Sender Identity.
    ("403 You are not authorized to send from that email address", SENDER),
], ids=["exim-relay", "exim-sender-verify", "sendmail-relay", "sendmail-authentication", "qmail-rcpthosts",
        "exchange-relay", "exchange-online-relay", "exchange-online-tenant", "exchange-online-anonymous",
        "starttls-required", "authentication-required", "gmail-relay-denied", "gmail-relay-credentials",
        "gmail-relay-authentication", "gmail-sending-denied", "gmail-direct", "postfix-spf-5.7.23",
        "postfix-spf-5.7.1", "postfix-relay-as-recipient", "reverse-dns", "null-mx-sender", "sendmail-sender-domain",
        "sendgrid-sender-identity"])
async def test_another_relays_refusal_of_this_worker_at_rcpt_is_retried_as_the_platforms_trouble(reply, refused,
                                                                                                caplog):
    # Before, only Postfix's words were recognised: another relay refusing this worker at RCPT read
    # as refusing the recipient, and a 5xx failed every email for good at its first attempt, quoting
    # our address or sender to the tenant.
    with SmtpServer() as smtp:
        smtp.refuse("oncall@example.com", reply)
        with pytest.raises(RetryableDeliveryError) as failure:
            await send_email(smtp_settings(smtp.port), "oncall@example.com", notification())
    assert str(failure.value) == refused_us(reply[:3], refused)
    assert reply.splitlines()[-1][4:] in caplog.text  # the operator's log has the reply


@pytest.mark.parametrize("reply", [
    "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found",
    "550 5.1.1 The email account that you tried to reach does not exist.",
    "550 5.1.1 <oncall@example.com>: Recipient address rejected: User unknown in relay recipient table",
    "550 Unrouteable address",
    # The recipient's own policy, in X.7.x: Postfix's check_recipient_access, Exchange Online's
    # directory-based edge blocking, Exchange's delivery restrictions (5.7.133's "authentication
    # required" is the group's: it takes only authenticated senders), Gmail's.
    "554 5.7.1 <oncall@example.com>: Recipient address rejected: Access denied",
    "550 5.4.1 Recipient address rejected: Access denied. AS(201806281)",
    "550 5.7.1 RESOLVER.RST.NotAuthorized; not authorized",
    "550 5.7.133 RESOLVER.RST.SenderNotAuthenticatedForGroup; authentication required; Delivery restriction check"
    " failed because the sender was not authenticated when sending to this group",
    "550 5.7.1 The user or domain that you are sending to (or from) has a policy that prohibits the mail that you"
    " sent.",
    # Postfix's address verification quoting the recipient's server, in words recognised as ours.
    "550 5.1.1 <oncall@example.com>: Recipient address rejected: undeliverable address: host"
    " mx.example.com[192.0.2.1] said: 550 5.7.1 Unable to relay (in reply to RCPT TO command)",
    "550 5.1.1 <oncall@example.com>: Recipient address rejected: undeliverable address: host"
    " mx.example.com[192.0.2.1] said: 550 5.7.25 Reverse DNS validation failed (in reply to RCPT TO command)",
], ids=["exchange-unknown", "gmail-unknown", "postfix-relay-recipient-table", "exim-unrouteable",
        "postfix-access-denied", "exchange-online-edge-blocking", "exchange-restricted", "exchange-group",
        "gmail-policy", "quoting-unable-to-relay", "quoting-reverse-dns"])
async def test_a_recipient_refused_in_any_relays_words_fails_for_good(reply):
    with SmtpServer() as smtp:
        smtp.refuse("oncall@example.com", reply)
        with pytest.raises(PermanentDeliveryError) as failure:
            await send_email(smtp_settings(smtp.port), "oncall@example.com", notification())
    assert str(failure.value) == f"SMTP {reply[:3]}: {reply[4:]}"  # the tenant reads why, as the relay said it


@pytest.mark.parametrize(("reply", "refused"), [
    # Amazon SES refuses an unverified identity at the end of DATA (an Exim log: "SMTP error from
    # remote mail server after end of data: 554 Message rejected: Email address is not verified").
    ("554 Message rejected: Email address is not verified. The following identities failed the check in region"
     " EU-WEST-1: alerts@alerting.example",
     "an address its account has not verified (SMTP_FROM, or any recipient while in SES's sandbox)"),
    # Exchange's SmtpResponse.SendAsDenied; Exchange Online's 5.7.60 (a log: after BDAT LAST).
    ("550 5.7.1 Client does not have permission to send as this sender", SENDER),
    ("550 5.7.60 SMTP; Client does not have permissions to send as this sender", SENDER),
    # Gmail (Google's SMTP error reference), after the message: RFC 7372's 5.7.26, over two lines.
    ("550-5.7.26 This message does not have authentication information or fails to\r\n"
     "550 5.7.26 pass authentication checks.", SENDER_AUTHENTICATION),
    ("550 5.7.1 Unauthenticated email is not accepted from this domain.", SENDER_AUTHENTICATION),
], ids=["ses-unverified", "exchange-send-as", "exchange-online-send-as", "gmail-unauthenticated",
        "gmail-unauthenticated-domain"])
async def test_a_relay_refusing_this_worker_once_it_has_the_message_is_retried_as_the_platforms_trouble(
        reply, refused, caplog):
    # Before, DATA's reply was always the message's: SES's refusal of an unverified SMTP_FROM failed
    # every email for good at its first attempt, naming our sender to the tenant.
    with SmtpServer() as smtp:
        smtp.refuse_messages(reply)
        with pytest.raises(RetryableDeliveryError) as failure:
            await send_email(smtp_settings(smtp.port), "oncall@example.com", notification())
        assert smtp.messages == []
    assert str(failure.value) == refused_us(reply[:3], refused)
    assert reply.splitlines()[-1][4:] in caplog.text


@pytest.mark.parametrize("reply", [
    "550 5.7.1 Our system has detected that this message is likely unsolicited mail. To reduce the amount of spam"
    " sent to Gmail, this message has been blocked.",
    "552 5.2.3 Your message exceeded Google's message size limits.",
], ids=["gmail-spam", "gmail-size"])
async def test_a_message_refused_for_what_it_is_fails_for_good(reply):
    with SmtpServer() as smtp:
        smtp.refuse_messages(reply)
        with pytest.raises(PermanentDeliveryError) as failure:
            await send_email(smtp_settings(smtp.port), "oncall@example.com", notification())
    assert str(failure.value) == f"SMTP {reply[:3]}: {reply[4:]}"


async def test_a_relay_refusing_starttls_for_good_is_retried_and_names_the_settings():
    # A refusal of STARTTLS (or of AUTH) is about the relay and the SMTP_* settings, the same for
    # every email: before, a 5xx failed each one for good.
    async def refuse_starttls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 relay.test ESMTP\r\n")
        replies = {b"EHLO": b"250-relay.test\r\n250 STARTTLS\r\n", b"STARTTLS": b"554 5.7.3 TLS not available\r\n"}
        while line := await reader.readline():
            writer.write(replies.get(line.split()[0].upper(), b"502 5.5.1 not here\r\n"))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse_starttls, "127.0.0.1", 0)
    async with server:
        settings = smtp_settings(server.sockets[0].getsockname()[1]).model_copy(update={"smtp_starttls": True})
        with pytest.raises(RetryableDeliveryError,
                           match=r"^SMTP 554: 5\.7\.3 TLS not available \(check the SMTP_\* settings\)$"):
            await send_email(settings, "oncall@example.com", notification())


async def test_a_reply_the_relay_garbled_is_retryable():
    # No reply code at all: aiosmtplib reports -1, the relay's trouble and no verdict on the message.
    with SmtpServer() as smtp:
        smtp.refuse("oncall@example.com", "garbled reply")
        with pytest.raises(RetryableDeliveryError, match="Malformed SMTP response"):
            await send_email(smtp_settings(smtp.port), "oncall@example.com", notification())


async def test_an_smtp_server_that_is_not_there_is_retryable():
    with pytest.raises(RetryableDeliveryError):
        await send_email(smtp_settings(free_port()), "oncall@example.com", notification())


async def test_a_relay_that_cannot_be_reached_is_not_named_to_the_tenant(caplog):
    # The reason is the delivery's last_error, which the tenant reads (GET /api/v1/notifications).
    # The relay is ours: its name, address and port are for the worker's log, as Redis's are. Before,
    # aiosmtplib's "Error connecting to <SMTP_HOST> on port <port>: ... ('<address>', <port>)" was it.
    port = free_port()
    with pytest.raises(RetryableDeliveryError) as failure:
        await send_email(smtp_settings(port), "oncall@example.com", notification())

    reason = str(failure.value)
    assert reason.startswith("could not connect to the SMTP relay: ConnectionRefusedError"), reason
    assert "127.0.0.1" not in reason and str(port) not in reason, reason
    assert f"Error connecting to 127.0.0.1 on port {port}" in caplog.text


async def test_a_relay_whose_certificate_is_for_another_name_is_not_named_to_the_tenant(tmp_path, monkeypatch,
                                                                                        caplog):
    # OpenSSL's text for the STARTTLS handshake names the relay we asked for ("IP address
    # mismatch, certificate is not valid for '127.0.0.1'", or SMTP_HOST's name): before, it was the
    # delivery's last_error as it came, read by the tenant.
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("relay.example").configure_cert(context)
    with SmtpServer(starttls=context) as smtp:
        settings = smtp_settings(smtp.port).model_copy(update={"smtp_starttls": True})
        with pytest.raises(RetryableDeliveryError) as failure:
            await send_email(settings, "oncall@example.com", notification())
        assert smtp.messages == []

    reason = str(failure.value)
    assert reason == ("TLS with the SMTP relay failed: SSLCertVerificationError CERTIFICATE_VERIFY_FAILED"
                      " (the platform's trouble, not the endpoint's)"), reason
    assert "127.0.0.1" in caplog.text  # the operator's log has the whole of it


async def test_requiring_starttls_from_a_server_without_it_sends_nothing_in_clear():
    with SmtpServer() as smtp:
        settings = smtp_settings(smtp.port).model_copy(update={"smtp_starttls": True})
        with pytest.raises(RetryableDeliveryError, match="STARTTLS"):
            await send_email(settings, "oncall@example.com", notification())
        assert smtp.messages == []


@pytest.mark.parametrize("line_break", ["\n", "\r", "\r\n", "\u2028", "\x85", "\x0b", "\x0c"])
def test_line_breaks_in_an_alert_become_spaces_in_the_subject(line_break):
    alert = Alert(alert_id="a-1", event_ts=1_700_000_000, severity="HIGH", source=f"pay{line_break}ments",
                  name=f"Checkout{line_break}{line_break}Latency")

    message = email_message(notification(alert), "alerts@example.com", "oncall@example.com")

    assert message["Subject"] == "[HIGH] pay ments: Checkout Latency"
    message.as_bytes()  # what aiosmtplib sends


async def test_a_relay_that_answers_every_command_just_in_time_is_bounded_by_the_timeout_as_a_whole():
    # Each reply takes 0.6 s, within aiosmtplib's per-command timeout of 1 s; the conversation
    # (MAIL, RCPT, DATA) takes 1.8 s, beyond SMTP_TIMEOUT_S. Without the bound on the whole
    # conversation the send would succeed; with it, it is cut before the relay took the message.
    with SmtpServer() as smtp:
        smtp.stall(0.6)
        settings = smtp_settings(smtp.port).model_copy(update={"smtp_timeout_s": 1})
        with pytest.raises(RetryableDeliveryError, match="timed out after 1s"):
            await send_email(settings, "oncall@example.com", notification())
        assert smtp.messages == []


async def test_a_message_the_relay_took_is_delivered_however_slow_the_relay_is_to_say_goodbye():
    # The relay answered DATA with 250: the message is its. Before, the QUIT after it was still within
    # SMTP_TIMEOUT_S, so a relay slow to answer QUIT made a delivered message a timeout, retried:
    # the recipient got it again.
    with SmtpServer() as smtp:
        smtp.stall_goodbye(5)
        settings = smtp_settings(smtp.port).model_copy(update={"smtp_timeout_s": 1})
        await send_email(settings, "oncall@example.com", notification())
        assert len(smtp.messages) == 1


async def test_goodbyes_to_a_relay_slow_to_answer_them_hold_no_more_connections_than_its_send_slots():
    # Each email's send ends at the relay's 250 to DATA, giving up its relay slot; its QUIT goes on in
    # the background. Before, every one did: a relay slow to answer QUIT held a connection open for
    # each email sent meanwhile, however many, past the relay's slots (and its connection limit).
    import psutil

    from alerting_app.channels import email

    def open_to_the_relay() -> int:
        return sum(1 for connection in psutil.Process().net_connections("tcp")
                   if connection.raddr and connection.raddr.port == smtp.port
                   and connection.status == psutil.CONN_ESTABLISHED)

    with SmtpServer() as smtp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(email, "_GOODBYE_S", 60.0)  # every goodbye under way stays so for the whole test
        smtp.stall_goodbye(60)
        settings = smtp_settings(smtp.port).model_copy(update={"delivery_endpoint_concurrency": 2,
                                                                "smtp_timeout_s": 60})  # aiosmtplib's bound on QUIT too
        for _ in range(6):
            await send_email(settings, "oncall@example.com", notification())
        assert len(smtp.messages) == 6
        # Two goodbyes wait for the relay; the other connections are closed (by the next turns of
        # the event loop: waited for, with a bound).
        async with asyncio.timeout(10):
            while open_to_the_relay() > 2:
                await asyncio.sleep(0.01)
        assert open_to_the_relay() == 2 == len(email._goodbyes)
        for goodbye in list(email._goodbyes):
            goodbye.cancel()


async def test_a_relay_that_stops_answering_is_left_at_the_timeout_not_asked_for_a_goodbye():
    # Before, the timeout's cancellation went through aiosmtplib's `async with`, which then sent QUIT
    # and waited for its answer for up to its per-command timeout: a hanging relay held each email
    # send (its worker slot, its claim) for twice SMTP_TIMEOUT_S, and the claim, made to outlive one
    # SMTP_TIMEOUT_S, could expire while the send still went on.
    commands: list[bytes] = []

    async def answer_until_data(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 relay.example\r\n")
        while line := await reader.readline():
            commands.append(line.split()[0].upper())
            if commands[-1] in (b"EHLO", b"HELO", b"MAIL", b"RCPT"):
                writer.write(b"250 OK\r\n")
            # DATA and anything after it: never answered, as a relay that hangs

    relay = await asyncio.start_server(answer_until_data, "127.0.0.1", 0)
    try:
        settings = smtp_settings(relay.sockets[0].getsockname()[1]).model_copy(update={"smtp_timeout_s": 1})
        with pytest.raises(RetryableDeliveryError, match="timed out after 1s"):
            await send_email(settings, "oncall@example.com", notification())
        assert b"DATA" in commands and b"QUIT" not in commands, commands
    finally:
        relay.close()


async def test_a_message_carries_the_date_and_a_message_id_that_every_attempt_repeats():
    # RFC 5322 requires Date; relays add neither header to mail from other hosts, and Gmail refuses
    # mail without a Message-ID. The same id on a retry lets mail clients recognise the copy.
    with SmtpServer() as smtp:
        for _ in range(2):
            await send_email(smtp_settings(smtp.port), "oncall@example.com", notification())

        first, again = smtp.messages
        assert abs(first["Date"].datetime.timestamp() - time.time()) < 60
        assert first["Message-ID"] == again["Message-ID"]
        assert first["Message-ID"].startswith("<6f1c2a34-0000-4000-8000-000000000002.")
        assert first["Message-ID"].endswith("@alerting.example>")
    other = email_message(notification(), "alerts@alerting.example", "other@example.com")
    assert other["Message-ID"] != first["Message-ID"]


def test_a_recipient_with_a_non_ascii_domain_is_addressed_by_its_idna_form():
    # Stored as typed (email-validator's normalised form); sent so, the To header held an encoded
    # word inside the address and the envelope needed a relay with SMTPUTF8.
    message = email_message(notification(), "alerts@alerting.example", "ops@bücher.example")

    assert b"\r\nTo: ops@xn--bcher-kva.example\r\n" in flatten_message(message, utf8=False, cte_type="7bit")


async def test_our_host_name_is_looked_up_once_per_process_not_for_every_email(monkeypatch):
    # aiosmtplib looked it up (socket.getfqdn, reverse DNS on a thread) for every connection, to greet
    # the relay: under a slow name server each email held a thread for the lookup's timeout.
    lookups = []
    real_getfqdn = socket.getfqdn

    def counted_getfqdn(name: str = "") -> str:
        lookups.append(name)
        return real_getfqdn(name)

    monkeypatch.setattr(socket, "getfqdn", counted_getfqdn)
    with SmtpServer() as smtp:
        for _ in range(3):
            await send_email(smtp_settings(smtp.port), "oncall@example.com", notification())
        assert len(smtp.messages) == 3
    assert len(lookups) <= 1


async def test_the_relay_is_greeted_with_smtp_helo_name_when_set_else_this_machines_name():
    # In a container this machine's name is often a bare id, which relays checking the greeting
    # refuse (Postfix: "504 Helo command rejected: need fully-qualified hostname", at RCPT): every
    # email failed for good, with no setting to give another name.
    with SmtpServer() as smtp:
        await send_email(smtp_settings(smtp.port).model_copy(update={"smtp_helo_name": "mail.alerting.example"}),
                         "oncall@example.com", notification())
        await send_email(smtp_settings(smtp.port), "oncall@example.com", notification())
        assert smtp.greeted_as == ["mail.alerting.example", socket.getfqdn()]
