"""Live events to browsers and API clients through the Channels layer.

The publisher names the audience explicitly (ARCHITECTURE "Live updates"): ``tenant_group`` for a
tenant's own reservation states and balance, ``reservation_group`` for one reservation's telemetry,
``FLEET_GROUP`` for operators. Events are sent after the transaction that made them commits; if
Redis is down the event is lost and logged, never the state (PostgreSQL is the truth).

Two control groups end live feeds when what opened them ends (``feeds_close_on_commit``):
``session_group`` (every feed opened with one session: sign-out) and ``member_group`` (every feed of
one user in one organization: the membership removed). Feeds also re-check on their own
(``console.kernel.consumers.FeedConsumer``), so a lost close only delays the end."""

import hashlib
import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

logger = logging.getLogger(__name__)

FLEET_GROUP = "fleet"


def tenant_group(organization_id) -> str:
    return f"tenant.{organization_id}"


def reservation_group(reservation_id) -> str:
    return f"reservation.{reservation_id}"


def session_group(session_key: str) -> str:
    # A digest: the session key is a credential, and group names travel through Redis.
    return f"session.{hashlib.sha256(session_key.encode()).hexdigest()[:40]}"


def member_group(organization_id, user_id) -> str:
    return f"member.{organization_id}.{user_id}"


def publish(group: str, event: str, data: dict) -> None:
    """Send now. Consumers receive ``{"type": "event.message", "event": ..., "data": ...}``."""
    async_to_sync(get_channel_layer().group_send)(group, {"type": "event.message", "event": event, "data": data})


def publish_many(messages: list[tuple[str, str, dict]]) -> None:
    """Send many ``(group, event, data)`` now, from one event loop: thousands of pushes at once (a
    rating run's balances) cost one loop and connection instead of one each (bench/billing)."""
    if not messages:
        return

    async def send_all() -> None:
        layer = get_channel_layer()
        for group, event, data in messages:
            await layer.group_send(group, {"type": "event.message", "event": event, "data": data})

    async_to_sync(send_all)()


def publish_on_commit(group: str, event: str, data: dict) -> None:
    def send() -> None:
        try:
            publish(group, event, data)
        except Exception:  # noqa: BLE001 - an event is rebuildable from rows; the write already committed
            logger.exception("Could not publish %s to %s", event, group)

    transaction.on_commit(send)


def feeds_close_on_commit(group: str) -> None:
    """Close every live feed in the control ``group`` once the transaction commits."""

    def send() -> None:
        try:
            async_to_sync(get_channel_layer().group_send)(group, {"type": "feed.close"})
        except Exception:  # noqa: BLE001 - the feeds' own re-check ends them later
            logger.exception("Could not close the feeds of %s", group)

    transaction.on_commit(send)
