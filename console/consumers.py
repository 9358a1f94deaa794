"""Shared pieces of the WebSocket consumers."""

import json

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer


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
    ``refusal_code``). Telemetry arrives pre-encoded and is forwarded unchanged; events as JSON."""

    refusal_code = 4403
    group: str | None = None

    async def audience(self) -> str | None:
        raise NotImplementedError

    async def connect(self):
        self.group = await self.audience()
        if self.group is None:
            # Accept, then close with the code: a close before accepting reaches a browser as a failed
            # handshake (1006), and it could not tell "not allowed, stop" from "retry".
            await self.accept()
            await self.close(code=self.refusal_code)
            return
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        pass  # the feed is one-way

    async def telemetry_frame(self, message):
        await self.send(text_data=message["text"])

    async def event_message(self, message):
        await self.send(text_data=json.dumps({"event": message["event"], "data": message["data"]}))
