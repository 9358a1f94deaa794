"""A workload that is a server (``params.serve``, docs/agent-protocol.md): a replica of an inference
endpoint. What the process driver needs for one beyond a plain workload: the spec checked before
anything starts, a free TCP port on the host, and a probe of its health route.

The probe is a bare HTTP/1.1 GET over asyncio's streams (the agent has no HTTP client dependency, and
needs only the status line): it runs in the agent's event loop, so a slow replica never blocks
heartbeats.
"""

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from typing import Any

from provisioning.agent.drivers.base import DriverError, Params

HOST = "127.0.0.1"  # replicas listen on the host's loopback only; the gateway reaches them through the node
DEFAULT_PORT_ARG = "--port"
DEFAULT_HEALTH_PATH = "/healthz"
DEFAULT_STARTUP_TIMEOUT_S = 120.0
MAX_STARTUP_TIMEOUT_S = 3600.0  # a large model on a cold disk takes minutes, not hours


@dataclass(frozen=True)
class ServeSpec:
    program: list[str]
    secret: str
    port_arg: str = DEFAULT_PORT_ARG
    health_path: str = DEFAULT_HEALTH_PATH
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S

    def argv(self, port: int) -> list[str]:
        return [*self.program, self.port_arg, str(port)]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def serve_of(params: Params) -> ServeSpec | None:
    """``params.serve`` checked, or None when the workload is a plain ``params.command``. Refused
    (DriverError, before anything starts) when malformed or given together with ``command``."""
    serve = params.get("serve")
    if serve is None:
        return None
    if not isinstance(serve, dict):
        raise DriverError("params.serve must be an object")
    if params.get("command") is not None:
        raise DriverError("give params.command or params.serve, not both")
    program = serve.get("program")
    if not isinstance(program, list) or not program or not all(isinstance(arg, str) and arg for arg in program):
        raise DriverError("params.serve.program must be a non-empty list of non-empty strings")
    secret = serve.get("secret")
    if not isinstance(secret, str) or not secret:
        raise DriverError("params.serve.secret must be a non-empty string")
    port_arg = serve.get("port_arg", DEFAULT_PORT_ARG)
    if not isinstance(port_arg, str) or not port_arg.startswith("-"):
        raise DriverError("params.serve.port_arg must be an option, such as '--port'")
    health_path = serve.get("health_path", DEFAULT_HEALTH_PATH)
    if not isinstance(health_path, str) or not health_path.startswith("/") or any(c in health_path for c in " \r\n"):
        raise DriverError("params.serve.health_path must be a path, such as '/healthz'")
    timeout = serve.get("startup_timeout_s", DEFAULT_STARTUP_TIMEOUT_S)
    if not _number(timeout) or not 0 < timeout <= MAX_STARTUP_TIMEOUT_S:
        raise DriverError(
            f"params.serve.startup_timeout_s must be a number of seconds, above 0 and at most {MAX_STARTUP_TIMEOUT_S:g}"
        )
    return ServeSpec(
        program=program,
        secret=secret,
        port_arg=port_arg,
        health_path=health_path,
        startup_timeout_s=float(timeout),
    )


def free_port(host: str = HOST) -> int:
    """A TCP port of ``host`` (the loopback, by default) that nothing listens on now. Another program may
    take it before the replica binds it; the replica then exits at once and the provisioning fails with
    its output."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


async def health_status(port: int, path: str, *, timeout: float) -> int | None:
    """The HTTP status of ``GET path`` on the replica, or None when it does not answer in time (not
    listening yet, hung, gone)."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode("ascii"))
            await writer.drain()
            status_line = await reader.readline()
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(timeout):
                    await writer.wait_closed()
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return None
    return int(parts[1])
