"""Shared pieces of the WebSocket consumers."""

import json
import time
from importlib import import_module
from types import SimpleNamespace

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.contrib import auth

from console.kernel.events import session_group

# A feed whose session or membership ended: the browser should stop, not reconnect.
CLOSE_ENDED = 4401


class WithoutDbHousekeeping:
    """Channels closes stale database connections on a thread hop before every message. Consumers whose
    database work all goes through database_sync_to_async (which does the same itself) skip it: on the
    telemetry fan-out that hop was a quarter of the server's CPU per message (MEASURED.md)."""

    async def dispatch(self, message):
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)


class FeedConsumer(WithoutDbHousekeeping, AsyncWebsocketConsumer):
    """A one-way feed to a browser from one Channels group, chosen in ``audience`` (None refuses with
    ``refusal_code``). Telemetry arrives pre-encoded and is forwarded unchanged; events as JSON.

    A feed lives no longer than what opened it: it also joins ``control_groups`` (its session's, and
    subclasses add the membership's), whose ``feed.close`` ends it with CLOSE_ENDED; and the first
    message after FEED_RECHECK_SECONDS re-reads the session and the audience before it is forwarded,
    so an end no one announced (a session expired or a user deleted, a close lost with Redis) is
    noticed too."""

    refusal_code = 4403
    group: str | None = None
    controls: tuple[str, ...] = ()
    checked_at = 0.0
    ended = False

    async def audience(self) -> str | None:
        raise NotImplementedError

    async def still_audience(self) -> bool:
        """Whether the refreshed user may still see the group joined; subclasses may ask more narrowly."""
        return await self.audience() == self.group

    def control_groups(self) -> tuple[str, ...]:
        session = self.scope.get("session")
        key = session.session_key if session is not None else None
        return (session_group(key),) if key else ()

    async def connect(self):
        self.group = await self.audience()
        if self.group is None:
            # Accept, then close with the code: a close before accepting reaches a browser as a failed
            # handshake (1006), and it could not tell "not allowed, stop" from "retry".
            await self.accept()
            await self.close(code=self.refusal_code)
            return
        self.controls = self.control_groups()
        for group in (*self.controls, self.group):
            await self.channel_layer.group_add(group, self.channel_name)
        self.checked_at = time.monotonic()
        await self.accept()

    async def disconnect(self, code):
        await self._leave()

    async def _leave(self):
        for group in (*self.controls, self.group) if self.group else ():
            await self.channel_layer.group_discard(group, self.channel_name)
        self.group, self.controls = None, ()

    async def end(self):
        """Stop forwarding at once (messages already queued included) and close."""
        self.ended = True
        await self._leave()
        await self.close(code=CLOSE_ENDED)

    async def feed_close(self, message):
        if not self.ended:
            await self.end()

    async def still_allowed(self) -> bool:
        if self.ended:
            return False
        if time.monotonic() - self.checked_at < settings.FEED_RECHECK_SECONDS:
            return True
        await self._refresh_credentials()
        if not await self.still_audience():
            await self.end()
            return False
        self.checked_at = time.monotonic()
        return True

    @database_sync_to_async
    def _refresh_credentials(self):
        # The session and user as a new connection would find them now (a signed-out session is gone,
        # a changed password no longer verifies, an inactive or deleted user is anonymous).
        session = self.scope.get("session")
        if session is None or session.session_key is None:
            return
        fresh = import_module(settings.SESSION_ENGINE).SessionStore(session_key=session.session_key)
        self.scope["session"] = fresh
        self.scope["user"] = auth.get_user(SimpleNamespace(session=fresh))

    async def receive(self, text_data=None, bytes_data=None):
        pass  # the feed is one-way

    async def telemetry_frame(self, message):
        if await self.still_allowed():
            await self.send(text_data=message["text"])

    async def event_message(self, message):
        if await self.still_allowed():
            await self.send(text_data=json.dumps({"event": message["event"], "data": message["data"]}))
