"""The agent's WebSocket (docs/agent-protocol.md). Authenticates the node secret on connect and then
speaks only for that node: every command id it mentions is looked up among its own node's commands.

Thin: parse a frame, call one service, answer. A bad frame is answered with an ``error`` frame and the
connection stays up; only a bad secret closes it (4401)."""

import json
import logging

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from console.kernel.consumers import FeedConsumer, WithoutDbHousekeeping
from console.kernel.errors import DomainError
from console.kernel.events import FLEET_GROUP
from provisioning import hooks
from provisioning.models import Node, NodeCommand
from provisioning.services import agents, telemetry

logger = logging.getLogger(__name__)
CLOSE_UNAUTHORIZED = 4401
WORKLOAD_STATES = ("healthy", "unhealthy", "exited")


def _bearer(scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


class FrameError(DomainError):
    code = "bad_frame"


def _require(frame: dict, field: str, kind: type | tuple[type, ...]):
    value = frame.get(field)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise FrameError(f"{frame.get('type')}: field {field!r} is missing or not a {getattr(kind, '__name__', kind)}.")
    return value


@database_sync_to_async
def _command_frame(node_id: int, command_id: str) -> dict | None:
    command = NodeCommand.objects.filter(pk=command_id, node_id=node_id).first()
    if command is None or command.finished:
        return None
    agents.node_command_sent(command=command)
    return command.as_frame()


@database_sync_to_async
def _unfinished_frames(node_id: int) -> list[dict]:
    frames = []
    for command in agents.node_commands_unfinished(node_id=node_id):
        agents.node_command_sent(command=command)
        frames.append(command.as_frame())
    return frames


class AgentConsumer(WithoutDbHousekeeping, AsyncWebsocketConsumer):
    node_id: int | None = None
    stream: telemetry.NodeStream | None = None

    async def connect(self):
        try:
            node = await database_sync_to_async(agents.node_authenticate)(secret=_bearer(self.scope))
        except agents.InvalidNodeSecret:
            logger.warning("Agent connection refused: unknown, revoked or rotated-away secret")
            await self.accept()
            await self.close(code=CLOSE_UNAUTHORIZED)
            return
        self.node_id = node.pk
        await self.channel_layer.group_add(agents.agent_group(node.pk), self.channel_name)
        await self.accept()
        await self.send_frame(
            {
                "type": "welcome",
                "node": node.hostname,
                "heartbeat_seconds": settings.AGENT_HEARTBEAT_SECONDS,
                "telemetry_seconds": settings.TELEMETRY_SECONDS,
            }
        )

    async def disconnect(self, code):
        if self.node_id is not None:
            await self.channel_layer.group_discard(agents.agent_group(self.node_id), self.channel_name)

    async def send_frame(self, frame: dict) -> None:
        await self.send(text_data=json.dumps(frame))

    async def receive(self, text_data=None, bytes_data=None):
        if self.node_id is None:
            return
        try:
            frame = self._parse(text_data, bytes_data)
            handler = getattr(self, f"on_{frame['type']}", None)
            if handler is None:
                raise FrameError(f"Unknown frame type {frame['type']!r}.", code="unknown_type")
            if frame["type"] != "telemetry":  # telemetry is the hot path; heartbeats keep last_seen_at
                await database_sync_to_async(agents.node_seen)(node_id=self.node_id)
            await handler(frame)
        except DomainError as error:
            await self.send_frame({"type": "error", "code": error.code, "message": error.message})

    def _parse(self, text_data, bytes_data) -> dict:
        raw = text_data if text_data is not None else (bytes_data or b"").decode("utf-8", "replace")
        if len(raw) > settings.AGENT_MAX_FRAME_BYTES:
            raise FrameError(
                f"Frame of {len(raw)} bytes is over the {settings.AGENT_MAX_FRAME_BYTES}-byte limit.",
                code="frame_too_large",
            )
        try:
            frame = json.loads(raw)
        except ValueError:
            raise FrameError("Frames are JSON objects.") from None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise FrameError("Frames are JSON objects with a string 'type'.")
        return frame

    # --- Frames from the agent ---

    async def on_hello(self, frame):
        gpus = _require(frame, "gpus", list)
        if len(gpus) > 64 or not all(isinstance(g, dict) for g in gpus):
            raise FrameError("hello: 'gpus' must be a list of at most 64 objects.")
        try:
            await database_sync_to_async(agents.node_hello)(
                node=await self._node(),
                agent_version=str(frame.get("agent_version", "")),
                driver_version=str(frame.get("driver_version", "")),
                gpus=gpus,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise FrameError(f"hello: a GPU entry is incomplete ({error}).") from None
        self.stream = await telemetry.stream_open(node_id=self.node_id)
        for command in await _unfinished_frames(self.node_id):
            await self.send_frame(command)

    async def on_telemetry(self, frame):
        await telemetry.ingest_batch(stream=self.stream, frame=frame, channel_layer=self.channel_layer)

    async def on_heartbeat(self, frame):
        pass  # node_seen already recorded it

    async def on_ack(self, frame):
        await database_sync_to_async(agents.node_command_acknowledged)(
            node_id=self.node_id, command_id=_require(frame, "command", str)
        )

    async def on_progress(self, frame):
        await database_sync_to_async(agents.node_command_progress)(
            node_id=self.node_id,
            command_id=_require(frame, "command", str),
            step=str(frame.get("step", "")),
            percent=_require(frame, "percent", (int, float)),
        )

    async def on_result(self, frame):
        detail = frame.get("detail") or {}
        if not isinstance(detail, dict):
            raise FrameError("result: 'detail' must be an object.")
        await database_sync_to_async(agents.node_command_finish)(
            node_id=self.node_id,
            command_id=_require(frame, "command", str),
            ok=_require(frame, "ok", bool),
            detail=detail,
            error=str(frame.get("error") or ""),
        )

    async def on_workload(self, frame):
        """A server the agent runs (a replica of an inference endpoint) changed state: logged, and told
        to whoever rents that workload (hooks.workload_reported) -- for this connection's node only, so
        an agent can speak only of workloads on its own node."""
        reservation, state = _require(frame, "reservation", str), _require(frame, "state", str)
        if state not in WORKLOAD_STATES:
            raise FrameError(f"workload: 'state' must be one of {', '.join(WORKLOAD_STATES)}.")
        level = logging.INFO if state == "healthy" else logging.WARNING
        logger.log(
            level,
            "Node %s: workload %s is %s: %s",
            self.node_id,
            reservation,
            state,
            str(frame.get("detail", ""))[:500],
        )
        await database_sync_to_async(hooks.workload_reported)(
            node_id=self.node_id, reservation=reservation, state=state, detail=str(frame.get("detail", ""))[:500]
        )

    async def on_secret_rotated(self, frame):
        await database_sync_to_async(agents.node_secret_rotated)(node=await self._node())

    @database_sync_to_async
    def _node(self):
        return Node.objects.get(pk=self.node_id)

    # --- Messages from the server side (channel layer group agent.<node id>) ---

    async def event_message(self, message):
        event, data = message.get("event"), message.get("data") or {}
        if event == "agent.command":
            frame = await _command_frame(self.node_id, data.get("id"))
            if frame is not None:
                await self.send_frame(frame)
        elif event == "agent.rotate":
            await self.send_frame({"type": "rotate_secret", "secret": data["secret"]})
        elif event == "agent.audience" and self.stream is not None:
            self.stream.audience = await database_sync_to_async(hooks.node_audience)(self.node_id)
        elif event == "agent.disconnect":
            await self.close(code=int(data.get("code", CLOSE_UNAUTHORIZED)))


class FleetConsumer(FeedConsumer):
    """The operators' fleet view: every node's telemetry summary and lifecycle moves. Staff only; it
    ends with the session, and a staff flag taken away is noticed at the next re-check."""

    async def audience(self):
        user = self.scope.get("user")
        return FLEET_GROUP if user is not None and user.is_authenticated and user.is_staff else None

    async def event_message(self, message):
        if message["event"] == "node.state" and await self.still_allowed():
            await self.send(text_data=json.dumps({"type": "node_state", **message["data"]}))
