"""The Slack channel: a valid incoming-webhook message (checked with Slack's own Block Kit models
from slack_sdk) that a person can read, posted to a real local receiver."""
from __future__ import annotations

import aiohttp
import pytest
from slack_sdk.models.blocks import Block

from alerting_app.channels.errors import RetryableDeliveryError
from alerting_app.channels.slack import send_slack, slack_message
from alerting_app.contracts import Alert, NotificationReady
from delivery_receivers import Receiver


def alert(n: int = 1, severity: str = "HIGH", **context: str) -> Alert:
    return Alert(alert_id=f"a-{n}", event_ts=1_700_000_000, severity=severity, source="payments",
                 name=f"CheckoutLatency{n}", context=context)


def notification(*alerts: Alert) -> NotificationReady:
    return NotificationReady(notification_id="6f1c2a34-0000-4000-8000-000000000002",
                             client_id="0c3f5d6e-0000-4000-8000-000000000003", alerts=list(alerts),
                             rule_ids=["1d2e3f40-0000-4000-8000-000000000004"])


def assert_valid_incoming_webhook_message(message: dict) -> None:
    """Slack's incoming-webhook format: `text`, and `blocks` that Slack's Block Kit accepts."""
    assert set(message) <= {"text", "blocks"}
    assert isinstance(message["text"], str) and message["text"]
    assert 1 <= len(message["blocks"]) <= 50
    for raw in message["blocks"]:
        block = Block.parse(raw)
        assert block is not None, f"unknown block type {raw.get('type')!r}"
        block.validate_json()  # raises on anything Slack would refuse (lengths, counts, types)
        assert block.to_dict() == raw  # nothing of ours was dropped as unknown


def all_text(message: dict) -> str:
    texts = [message["text"]]
    for block in message["blocks"]:
        texts += [block.get("text", {}).get("text", "")]
        texts += [field["text"] for field in block.get("fields", [])]
        texts += [element["text"] for element in block.get("elements", [])]
    return "\n".join(texts)


def test_one_alert_reads_as_severity_source_name_and_context():
    message = slack_message(notification(alert(1, region="eu-west-1", pod="checkout-7")))

    assert_valid_incoming_webhook_message(message)
    assert message["text"] == "[HIGH] payments: CheckoutLatency1"
    text = all_text(message)
    for expected in ("*Severity*\nHIGH", "*Source*\npayments", "*Name*\nCheckoutLatency1",
                     "region: `eu-west-1`", "pod: `checkout-7`", "2023-11-14 22:13:20 UTC"):
        assert expected in text
    assert "grouped" not in text


def test_a_grouped_notification_says_how_many_alerts_it_holds_and_leads_with_the_worst():
    message = slack_message(notification(alert(1, "LOW"), alert(2, "CRITICAL"), alert(3, "HIGH")))

    assert_valid_incoming_webhook_message(message)
    assert message["text"] == "[CRITICAL] 3 alerts: payments: CheckoutLatency1, +2 more"
    text = all_text(message)
    assert "*3 alerts* grouped in this notification" in text
    assert all(f"CheckoutLatency{n}" in text for n in (1, 2, 3))


def test_a_large_group_stays_within_slacks_limits_and_counts_what_it_leaves_out():
    message = slack_message(notification(*(alert(n, note="x" * 200) for n in range(1, 31))))

    assert_valid_incoming_webhook_message(message)
    # Up to 20 alerts shown, as docs/delivery.md says (not MAX_ALERTS_SHOWN, whatever it becomes).
    assert "and 10 more not shown" in all_text(message)
    assert "CheckoutLatency20" in all_text(message) and "CheckoutLatency21" not in all_text(message)


def test_a_group_of_two_says_it_holds_two_alerts():
    message = slack_message(notification(alert(1), alert(2)))

    assert "*2 alerts* grouped in this notification" in all_text(message)


@pytest.mark.parametrize("alerts", [1, 20], ids=["one alert", "as many as are shown"])
def test_a_notification_whose_alerts_are_all_shown_says_nothing_is_left_out(alerts):
    message = slack_message(notification(*(alert(n) for n in range(1, alerts + 1))))

    assert "not shown" not in all_text(message)


def test_a_headline_of_the_header_blocks_length_is_kept_whole_and_a_longer_one_is_clipped_to_it():
    def header(name_length: int) -> str:
        named = alert().model_copy(update={"source": "s", "name": "n" * name_length})
        return slack_message(notification(named))["blocks"][0]["text"]["text"]

    fits = 150 - len("[HIGH] s: ")  # the header block holds 150 characters
    assert header(fits) == "[HIGH] s: " + "n" * fits
    assert header(fits + 1) == "[HIGH] s: " + "n" * (fits - 1) + "…"


def test_text_from_alerts_cannot_inject_slack_markup():
    message = slack_message(notification(alert(1, link="<!channel> & <https://evil.example|click>")))

    assert_valid_incoming_webhook_message(message)
    text = all_text(message)
    assert "<!channel>" not in text
    assert "&lt;!channel&gt; &amp; &lt;https://evil.example|click&gt;" in text
    # Nor is a bare "@channel", "#general" or URL linked or parsed by Slack's pre-pass.
    alert_text = [obj for block in message["blocks"] if block["type"] == "section"
                  for obj in [*block.get("fields", []), *([block["text"]] if "text" in block else [])]]
    assert alert_text and all(obj["verbatim"] is True for obj in alert_text)


def test_a_source_or_name_cannot_inject_slack_markup_in_the_notifications_text():
    named = alert().model_copy(update={"source": "<!channel>", "name": "<https://evil.example|click> & co"})

    message = slack_message(notification(named))

    assert message["text"] == "[HIGH] &lt;!channel&gt;: &lt;https://evil.example|click&gt; &amp; co"


def test_an_alert_with_more_context_than_a_section_holds_is_clipped_to_a_valid_message():
    message = slack_message(notification(alert(1, **{f"key{n}": "v" * 100 for n in range(40)})))

    assert_valid_incoming_webhook_message(message)
    context = message["blocks"][2]["text"]["text"]
    assert len(context) == 3000 and context.endswith("…")

async def test_the_message_is_posted_as_json_to_the_incoming_webhook():
    async with Receiver() as receiver, aiohttp.ClientSession() as session:
        sent = notification(alert(1, region="eu-west-1"))
        await send_slack(session, receiver.url("services/T0/B0/X"), sent, 5.0)

        [post] = receiver.posts
        assert post.headers["Content-Type"] == "application/json"
        assert post.body == slack_message(sent)


async def test_slack_answering_5xx_is_retryable():
    async with Receiver() as receiver, aiohttp.ClientSession() as session:
        receiver.answer("hook", 503)
        with pytest.raises(RetryableDeliveryError, match="HTTP 503"):
            await send_slack(session, receiver.url(), notification(alert()), 5.0)


def test_a_truncated_group_counts_the_alerts_it_does_not_list():
    grouped = notification(alert(1), alert(2)).model_copy(update={"truncated_alerts": 30})

    message = slack_message(grouped)

    assert_valid_incoming_webhook_message(message)
    text = str(message["blocks"])
    assert "*32 alerts* grouped in this notification" in text
    assert "and 30 more not shown" in text
    assert message["text"].startswith("[HIGH] 32 alerts:")


def test_a_truncated_group_listing_one_alert_reads_as_the_group_it_stands_for():
    grouped = notification(alert(1)).model_copy(update={"truncated_alerts": 4})

    message = slack_message(grouped)

    assert message["text"] == "[HIGH] 5 alerts: payments: CheckoutLatency1, +4 more"
    assert "*5 alerts* grouped in this notification" in all_text(message)

def test_a_time_out_of_range_is_shown_as_its_raw_number_instead_of_failing_the_message():
    # Milliseconds sent as seconds: no date Python can print. (The contract now refuses such alerts;
    # rows and messages from before it still carry them.)
    milliseconds = Alert.model_construct(**{**alert().model_dump(), "event_ts": 1.7e12})

    message = slack_message(notification(milliseconds))

    assert_valid_incoming_webhook_message(message)
    assert "*When*\n1700000000000.0 (unix seconds, out of range)" in all_text(message)
