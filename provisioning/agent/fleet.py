"""A fleet host: many simulated nodes in one process and one asyncio loop, for demos and load tests. Each
node is a full agent with its own connection, secret and state sub-directory (``<state-dir>/<hostname>``),
so the console cannot tell them from separate hosts. One node's failure stops that node only."""

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioning.agent.client import AgentRefused, NodeAgent
from provisioning.agent.credentials import has_credentials
from provisioning.agent.enrollment import EnrollmentError, enroll

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleetMember:
    """One node of the tokens file. The optional hardware hints (written by ``manage.py create_node_token
    --json``) let a simulated node report the GPUs the console expects of it."""

    hostname: str
    token: str | None  # None: enrolled before, the stored secret is used
    gpus: int | None = None
    gpu_name: str | None = None
    gpu_memory_mib: int | None = None
    gpu_power_limit_w: int | None = None


def load_members(path: Path) -> list[FleetMember]:
    """``[{"hostname": ..., "token": ... | null, hints...}, ...]``; raises ValueError saying what is wrong."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ValueError(f"{path}: expected a JSON list of {{hostname, token}} objects")
    members = [_member(item, f"{path}: entry {position}") for position, item in enumerate(data)]
    hostnames = [member.hostname for member in members]
    if len(set(hostnames)) != len(hostnames):
        raise ValueError(f"{path}: a hostname appears twice")
    return members


def _member(item: dict[str, Any], where: str) -> FleetMember:
    hostname = item.get("hostname")
    if not isinstance(hostname, str) or not hostname or "/" in hostname or hostname in (".", ".."):
        raise ValueError(f"{where} needs a hostname that can name a directory")
    expected = {"token": str, "gpus": int, "gpu_name": str, "gpu_memory_mib": int, "gpu_power_limit_w": int}
    for field, kind in expected.items():
        if item.get(field) is not None and not isinstance(item[field], kind):
            raise ValueError(f"{where} ({hostname}): {field} must be a {kind.__name__} or null")
    return FleetMember(hostname=hostname, **{field: item.get(field) for field in expected})


async def enrolled_state_dir(member: FleetMember, *, server: str, state_dir: Path) -> Path | None:
    """The member's state directory, enrolling it first if it holds no secret; None (logged) if it cannot
    be. A member already enrolled is not enrolled again: its token was consumed the first time."""
    member_dir = state_dir / member.hostname
    if has_credentials(member_dir):
        return member_dir
    if member.token is None:
        logger.error("%s: stopped (no stored secret and no token to enrol with)", member.hostname)
        return None
    logger.info("%s: enrolling", member.hostname)
    try:
        await asyncio.to_thread(
            enroll, server=server, token=member.token, hostname=member.hostname, state_dir=member_dir
        )
    except EnrollmentError as exc:
        logger.error("%s: stopped (enrolment failed: %s)", member.hostname, exc)
        return None
    logger.info("%s: enrolled", member.hostname)
    return member_dir


async def run_fleet(
    members: list[FleetMember],
    *,
    server: str,
    state_dir: Path,
    build_agent: Callable[[FleetMember, Path], NodeAgent],
) -> None:
    """Enrol who needs it, then run every agent until cancelled or until each has stopped on its own.
    ``build_agent(member, member_state_dir)`` makes one node's agent (its backend and driver)."""
    prepared = await asyncio.gather(
        *(enrolled_state_dir(member, server=server, state_dir=state_dir) for member in members)
    )
    agents = [
        build_agent(member, member_dir)
        for member, member_dir in zip(members, prepared, strict=True)
        if member_dir is not None
    ]
    logger.info("fleet: %d of %d nodes enrolled, connecting", len(agents), len(members))
    running = [asyncio.create_task(_run_member(agent), name=f"agent {agent.node}") for agent in agents]
    if not running:
        return
    try:
        await asyncio.wait(running)
    finally:
        # Cancelled (a signal): every agent stops in full -- its applies cut off, its driver's servers
        # stopped -- before the fleet returns. (gather would return once the first had stopped, and
        # asyncio.run would then cancel the others again, in the middle of stopping, leaving servers.)
        for task in running:
            task.cancel()
        await asyncio.wait(running)


async def _run_member(agent: NodeAgent) -> None:
    try:
        await agent.run()
    except AgentRefused:
        pass  # the agent logged "refused" and "stopped"; the others carry on
    except Exception:  # one node's failure must not stop the rest of the fleet
        logger.exception("%s: stopped (the agent failed)", agent.node)
