"""What the node agent's tests share: a real WebSocket server playing the console's side of
docs/agent-protocol.md, enrolled state directories, and agents wired for speed."""

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pynvml
import websockets
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from provisioning.agent.backends.simulated import SimulatedBackend
from provisioning.agent.client import Backoff, NodeAgent
from provisioning.agent.credentials import Credentials, store_credentials
from provisioning.agent.drivers.base import HostDriver, Params, ProgressCallback
from provisioning.agent.drivers.simulated import SimulatedDriver

FRAME_TIMEOUT_S = 5
SECRET = "ncn_test_0123456789abcdef"
NODE = "fra-hall-1-r01-n01"
NODE_GPUS = 2  # of the simulated backend make_agent gives an agent unless told otherwise


class FakeConsole:
    """The console's side of the protocol on a real websockets server at 127.0.0.1 (any free port).

    Accepts ``secrets`` (any secret when None), closing others with 4401 after accepting, as the real
    consumer does; or refuses every handshake with ``refuse_http`` (a console that answers 401/403)."""

    def __init__(
        self, *, secrets: set[str] | None = None, refuse_http: int | None = None, heartbeat_seconds: float = 0.05
    ) -> None:
        self.secrets = secrets
        self.refuse_http = refuse_http
        self.heartbeat_seconds = heartbeat_seconds
        self.authorizations: list[str | None] = []
        self.connections: list[ServerConnection] = []
        self.frames: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue()
        self.url = ""

    async def __aenter__(self) -> "FakeConsole":
        self._server = await websockets.serve(self._handle, "127.0.0.1", 0, process_request=self._process_request)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.authorizations.append(request.headers.get("Authorization"))
        if self.refuse_http is not None:
            return connection.respond(self.refuse_http, "Refused\n")
        return None

    async def _handle(self, connection: ServerConnection) -> None:
        number = len(self.connections)
        self.connections.append(connection)
        if self.secrets is not None and connection.request.headers.get("Authorization") not in {
            f"Bearer {secret}" for secret in self.secrets
        }:
            await connection.close(4401, "unknown secret")
            return
        await self.send({"type": "welcome", "node": NODE, "heartbeat_seconds": self.heartbeat_seconds}, number)
        with contextlib.suppress(ConnectionClosed):
            async for raw in connection:
                await self.frames.put((number, json.loads(raw)))

    async def send(self, frame: dict[str, Any] | str, connection: int = -1) -> None:
        await self.connections[connection].send(frame if isinstance(frame, str) else json.dumps(frame))

    async def drop(self) -> None:
        """Close the current connection as a restarting console would (1012: service restart)."""
        await self.connections[-1].close(1012, "restarting")

    async def next_frame(self, skip: tuple[str, ...] = ("heartbeat",)) -> tuple[int, dict[str, Any]]:
        """The next frame not of a ``skip`` type, with the number of the connection it came on."""
        while True:
            number, frame = await asyncio.wait_for(self.frames.get(), FRAME_TIMEOUT_S)
            if frame["type"] not in skip:
                return number, frame

    async def frames_until(self, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        frames = []
        while True:
            _, frame = await self.next_frame()
            frames.append(frame)
            if done(frame):
                return frames


def enrolled(state_dir: Path, secret: str = SECRET, node: str = NODE) -> Path:
    store_credentials(state_dir, Credentials(node=node, secret=secret))
    return state_dir


def fast_backoff() -> Backoff:
    return Backoff(base_s=0.01, cap_s=0.05, rng=random.Random(0))


class CountingDriver(SimulatedDriver):
    """The simulated driver, counting how many times a provisioning really started."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**{"speed": 100.0, "gpu_count": NODE_GPUS, **options})
        self.provisions = 0

    async def provision(self, params: Params, progress: ProgressCallback) -> dict[str, Any]:
        self.provisions += 1
        return await super().provision(params, progress)


def make_agent(
    server: str,
    state_dir: Path,
    *,
    driver: HostDriver | None = None,
    backend: SimulatedBackend | None = None,
    **options: Any,
) -> NodeAgent:
    return NodeAgent(
        server=server,
        state_dir=state_dir,
        backend=backend or SimulatedBackend(hostname=NODE, gpus=NODE_GPUS, seed=1),
        driver=driver or CountingDriver(),
        backoff=fast_backoff(),
        **options,
    )


@contextlib.asynccontextmanager
async def running(agent: NodeAgent) -> AsyncIterator[asyncio.Task[None]]:
    """The agent running in a task for the duration of the block, then stopped as SIGTERM would."""
    task = asyncio.create_task(agent.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.wait([task])


def nvml_present() -> bool:
    """Whether this host has a working NVML (an NVIDIA driver): the no-GPU tests only mean something
    without one, and a GPU host runs the nvml backend for real instead (bench/gpu_check.py)."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True
