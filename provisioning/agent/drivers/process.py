"""Runs a tenant's workload (``params.command``, a list of arguments) as a local process.

The workload gets a clean environment (none of the agent's variables, which may hold secrets) in which
only its reservation's GPUs (``params.gpus``) are visible, through its vendor's variables
(``drivers.visibility``); its own working directory under the state directory (output in
``output.log``) and its own session, hence its own process group: ``release`` stops the whole group,
SIGTERM first and SIGKILL after a grace period, so whatever the workload forked goes with it, and
nothing of another reservation's workload on the same node. Process groups and their GPUs are recorded
in ``workloads.json`` so an agent restarted in between (which leaves workloads running: an agent upgrade
must not kill tenants) can still release them and knows which GPUs are taken. A recorded group whose
processes have all exited counts as released. Process groups are found through /proc (Linux, like the
GPU hosts).

A workload may instead be a server (``params.serve``, drivers.replica): a replica of an inference
endpoint. The driver gives it a free port of the loopback (``--port N`` appended to its program) and
its secret in its environment (never on its command line, which every user of the host can read), then
waits for its health route to answer 200 before the provisioning succeeds, with the replica's
``address`` in the result; a replica that exits or is not ready within its startup timeout fails the
provisioning, and its group is stopped. Its port is recorded with its group, so ``check_workloads``
(the agent's periodic health check) finds it after an agent restart too.

A reservation may instead, or as well, be logged into (``params.access``, drivers.access): the driver
makes its account, runs the image's steps (``params.image``: each ``run`` as the account, in its home,
with only its GPUs visible; one that fails fails the provisioning with its last output line), installs
its keys and starts its SSH server; ``params.command`` is then optional (a node rented to log into runs
no workload of its own). Its release ends the access too. Access outlives an agent restart, as
workloads do; an agent starting starts again a server that died meanwhile (``SshAccess.resume``).
Sessions see the reservation's GPUs through the same variables as workloads; the host's real
``nvidia-smi`` ignores them and lists every GPU: device cgroups (which this driver does not set up) are
what would hide the others from it.
"""

import asyncio
import contextlib
import os
import signal
import sysconfig
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioning.agent.drivers.access import SshAccess, access_of
from provisioning.agent.drivers.access.accounts import MARKER, Account, account_environment
from provisioning.agent.drivers.base import (
    DriverError,
    Gpus,
    HostDriver,
    Params,
    ProgressCallback,
    WorkloadHealth,
    ensure_free,
    gpu_vendor_of,
    gpus_of,
    no_progress,
    progress_between,
    progress_parts,
    reservation_uuid_of,
    spawn_logged,
)
from provisioning.agent.drivers.image import Image, image_of
from provisioning.agent.drivers.replica import HOST, ServeSpec, free_port, health_status, serve_of
from provisioning.agent.drivers.visibility import visibility_environment
from provisioning.agent.serving import SECRET_ENV
from provisioning.agent.state import ensure_state_dir, read_json, write_json_atomic

REGISTRY = "workloads.json"
WORKLOAD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GRACE_S = 10.0
KILL_WAIT_S = 5.0
POLL_S = 0.05
PROC = Path("/proc")
STEP = "start workload"
SERVER_STEPS = ("start server", "load model", "ready")
READY_POLL_S = 0.2
PROBE_TIMEOUT_S = 2.0  # one health check; a replica this slow to say "ok" is not serving either
UNHEALTHY_AFTER = 2  # failed checks in a row before a running replica counts as unhealthy
OUTPUT_TAIL_BYTES = 4096
IMAGE_STEP_TIMEOUT_S = 3600.0  # a step that hangs would hold the node's commands back for good
ACCESS_LISTEN = "0.0.0.0"  # noqa: S104 - a real host's tenants connect to its SSH servers from outside


@dataclass(frozen=True)
class Workload:
    group: int  # the leader's pid, which is the process group's id
    gpus: Gpus
    port: int | None = None  # a server's (params.serve)
    health_path: str | None = None

    @property
    def address(self) -> str | None:
        return None if self.port is None else f"{HOST}:{self.port}"


class ProcessDriver(HostDriver):
    name = "process"

    def __init__(
        self,
        *,
        state_dir: Path,
        gpu_count: int,
        grace_s: float = GRACE_S,
        access_listen: str = ACCESS_LISTEN,
        access_host: str | None = None,
        ssh_server: str = "auto",
        access_dir: Path | None = None,
    ) -> None:
        """``access_listen``: the address SSH servers listen on; ``access_host``: the one tenants are told
        to connect to (None: this host's FQDN); ``ssh_server``: ``auto``, ``openssh`` or ``asyncssh``."""
        self._state_dir = state_dir
        self._gpu_count = gpu_count
        self._grace = grace_s
        self._children: dict[str, asyncio.subprocess.Process] = {}  # reaped by asyncio's child watcher
        self._busy: set[str] = set()  # reservations being started or stopped: not checked meanwhile
        self._failed_checks: dict[str, int] = {}
        self.access = SshAccess(
            state_dir=state_dir,
            listen=access_listen,
            host=access_host,
            ssh_server=ssh_server,
            grace_s=grace_s,
            access_dir=access_dir,
        )

    async def provision(self, params: Params, progress: ProgressCallback) -> dict[str, Any]:
        reservation = reservation_uuid_of(params)
        serve = serve_of(params)
        image = image_of(params)
        keys = access_of(params)
        if serve is not None and keys is not None:
            raise DriverError("a replica is not logged into: give params.serve or params.access, not both")
        command = serve.program if serve is not None else _command_of(params, optional=keys is not None)
        gpus = gpus_of(params, gpu_count=self._gpu_count)
        visibility = visibility_environment(gpu_vendor_of(params), gpus)
        running = self._registry().get(reservation)
        live = self.access.live(reservation)
        access = {} if live is None else {"access": live}
        if running is not None and _group_alive(running.group):
            detail = {"reservation": reservation, "pid": running.group, "gpus": list(running.gpus)}
            if running.address is not None:
                detail["address"] = running.address
            return {**detail, **access, "already_running": True}
        if command is None and live is not None:
            return {"reservation": reservation, "gpus": list(gpus), **access, "already_running": True}
        ensure_free(reservation=reservation, gpus=gpus, holdings=self.holdings())
        if serve is not None:
            return await self._provision_server(reservation, serve, gpus, visibility, progress)
        shares = progress_parts(progress, sum(part is not None for part in (image, keys, command)))
        detail: dict[str, Any] = {"reservation": reservation, "gpus": list(gpus)}
        try:
            account = None if keys is None else await self.access.prepare(reservation, gpus)
            if image is not None:
                await self._prepare_image(reservation, image, account, visibility, shares.pop(0))
                detail["image"] = image.slug
            if account is not None and keys is not None:
                detail["access"] = await self.access.open(reservation, account, keys, visibility, shares.pop(0))
            if command is not None:
                detail.update(await self._provision_workload(reservation, command, gpus, visibility, shares.pop(0)))
        except Exception:
            if keys is not None:  # nothing of an access that never opened is left
                await self.access.close(reservation, no_progress)
            raise
        return detail

    async def _provision_workload(
        self, reservation: str, command: list[str], gpus: Gpus, visibility: dict[str, str], progress: ProgressCallback
    ) -> dict[str, Any]:
        await progress(STEP, 0)
        process = await self._start(reservation, command, visibility)
        self._children[reservation] = process
        self._save({**self._registry(), reservation: Workload(group=process.pid, gpus=gpus)})
        await progress(STEP, 100)
        return {"pid": process.pid, "command": command}

    async def update_access(self, params: Params, progress: ProgressCallback) -> dict[str, Any]:
        return await self.access.update(params, progress)

    async def release(self, params: Params, progress: ProgressCallback) -> dict[str, Any]:
        """Stop the reservation's workload, then end its access; either may be all it had."""
        reservation = reservation_uuid_of(params)
        has_workload, has_access = reservation in self._registry(), self.access.records(reservation)
        gpus, stopped = self.access.holdings().get(reservation, ()), False
        if has_workload:
            share = progress_between(progress, 0, 50 if has_access else 100)
            await share("stop workload", 0)
            self._busy.add(reservation)
            try:
                workload, stopped = await self._stop(reservation)
            finally:
                self._busy.discard(reservation)
            await share("stop workload", 100)
            gpus = workload.gpus if workload is not None else gpus
        if has_access:
            ended = await self.access.close(reservation, progress_between(progress, 50 if has_workload else 0, 100))
            stopped = stopped or ended
        return {"reservation": reservation, "stopped": stopped, "gpus": list(gpus)}

    def holdings(self) -> dict[str, Gpus]:
        """A workload holds its GPUs while it runs, an access until its release (a tenant logged in
        may use them at any moment)."""
        return {**self.access.holdings(), **self._live(self._registry())}

    def records(self, reservation: str) -> bool:
        """Whether a workload of ``reservation`` is recorded here (running or not, until its release)."""
        return reservation in self._registry()

    async def stop_all(self) -> list[str]:
        """Stop every recorded workload's process group now, all at once, keeping the records; returns
        the reservations whose processes still ran. For a host whose workloads must not outlive its
        agent (the simulated driver's servers): when the agent starts again, ``check_workloads``
        reports them ``exited``, so the console replaces them, and their release forgets them."""
        registry = self._registry()
        stopped = await asyncio.gather(*(_stop_group(workload.group, self._grace) for workload in registry.values()))
        for reservation in registry:
            process = self._children.pop(reservation, None)
            if process is not None:
                await process.wait()
        return [reservation for reservation, ran in zip(registry, stopped, strict=True) if ran]

    async def start(self) -> None:
        await self.access.resume()

    async def teardown(self) -> AsyncIterator[str]:
        """Stop every recorded workload and release every recorded access, as their releases would; a
        line for each, saying what it was. For a host whose agent is gone for good (``neocloud-agent
        teardown``)."""
        for reservation, workload in self._registry().items():
            _, ran = await self._stop(reservation)
            yield (
                f"stopped the workload of reservation {reservation} (process group {workload.group}"
                f"{'' if ran else ', which had exited'})"
            )
        async for line in self.access.teardown():
            yield line

    async def check_workloads(self) -> dict[str, WorkloadHealth]:
        """One health check of every recorded server at once (a hung one costs PROBE_TIMEOUT_S, not one
        per server). A single failed check is not yet ``unhealthy``: a replica busy with a large batch
        may miss one."""
        servers = {
            reservation: workload
            for reservation, workload in self._registry().items()
            if workload.port is not None and reservation not in self._busy
        }
        checked = await asyncio.gather(
            *(self._check(reservation, workload) for reservation, workload in servers.items())
        )
        for reservation in set(self._failed_checks) - set(servers):
            del self._failed_checks[reservation]
        return dict(zip(servers, checked, strict=True))

    async def _check(self, reservation: str, workload: Workload) -> WorkloadHealth:
        if not _group_alive(workload.group):
            return WorkloadHealth("exited", f"the server {await self._exit_words(reservation)}")
        status = await health_status(workload.port, workload.health_path or "/", timeout=PROBE_TIMEOUT_S)
        if status == 200:
            self._failed_checks.pop(reservation, None)
            return WorkloadHealth("healthy")
        failed = self._failed_checks[reservation] = self._failed_checks.get(reservation, 0) + 1
        answer = "did not answer" if status is None else f"answered HTTP {status}"
        if failed < UNHEALTHY_AFTER:
            return WorkloadHealth("healthy", f"its health route {answer} once")
        return WorkloadHealth(
            "unhealthy",
            f"GET {workload.health_path} on {workload.address} {answer} ({failed} checks in a row, "
            f"{PROBE_TIMEOUT_S:g} s each at most)",
        )

    # --- Image (params.image) ---

    async def _prepare_image(
        self,
        reservation: str,
        image: Image,
        account: Account | None,
        visibility: dict[str, str],
        progress: ProgressCallback,
    ) -> None:
        """Run the image's steps one after the other: as the reservation's account in its home when it is
        logged into, else where and as its workload runs."""
        if account is None:
            workdir = ensure_state_dir(self._workdir(reservation))
            identity: dict[str, Any] = {}
            environment = {"PATH": WORKLOAD_PATH, "HOME": str(workdir), "LANG": "C.UTF-8", **visibility}
            environment[MARKER] = reservation
        else:
            workdir, identity = account.home, account.identity()
            environment = account_environment(account, reservation, visibility)
        for number, step in enumerate(image.steps):
            await progress(step.progress_step, 100 * number // len(image.steps))
            if step.run is not None:
                await self._run_step(step.name, step.run, workdir, environment, identity)
        if image.steps:
            await progress(image.steps[-1].progress_step, 100)

    async def _run_step(
        self, name: str, argv: tuple[str, ...], workdir: Path, environment: dict[str, str], identity: dict[str, Any]
    ) -> None:
        """Run one step; DriverError with its last line of output when it fails or hangs (then its
        process group is stopped)."""
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=workdir,
                env=environment,
                start_new_session=True,
                **identity,
            )
        except OSError as exc:
            raise DriverError(f"image step {name!r} cannot start {argv[0]!r}: {exc.strerror or exc}") from exc
        tail = b""
        try:
            async with asyncio.timeout(IMAGE_STEP_TIMEOUT_S):
                while chunk := await process.stdout.read(OUTPUT_TAIL_BYTES):
                    tail = (tail + chunk)[-OUTPUT_TAIL_BYTES:]
                returncode = await process.wait()
        except TimeoutError:
            await _stop_group(process.pid, self._grace)
            await process.wait()
            raise DriverError(
                f"image step {name!r} did not finish within {IMAGE_STEP_TIMEOUT_S:g} s{_last_line(tail)}"
            ) from None
        if returncode != 0:
            raise DriverError(f"image step {name!r} {_exit_status(returncode)}{_last_line(tail)}")

    # --- Servers (params.serve) ---

    async def _provision_server(
        self, reservation: str, serve: ServeSpec, gpus: Gpus, visibility: dict[str, str], progress: ProgressCallback
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        port = free_port()
        argv = serve.argv(port)
        self._busy.add(reservation)
        try:
            await progress(SERVER_STEPS[0], 0)
            process = await self._start(reservation, argv, visibility, secret=serve.secret)
            self._children[reservation] = process
            self._save(
                {
                    **self._registry(),
                    reservation: Workload(group=process.pid, gpus=gpus, port=port, health_path=serve.health_path),
                }
            )
            try:
                await self._wait_ready(reservation, process, port, serve, progress)
            except DriverError:
                await self._stop(reservation)  # nothing of a replica that never served is left running
                raise
        finally:
            self._busy.discard(reservation)
        await progress(SERVER_STEPS[2], 100)
        return {
            "reservation": reservation,
            "pid": process.pid,
            "gpus": list(gpus),
            "address": f"{HOST}:{port}",
            "command": argv,
            "startup_s": round(loop.time() - started, 3),
        }

    async def _wait_ready(
        self,
        reservation: str,
        process: asyncio.subprocess.Process,
        port: int,
        serve: ServeSpec,
        progress: ProgressCallback,
    ) -> None:
        """Until the health route answers 200. The first answer of any other status means the server
        listens and loads its model ("load model")."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + serve.startup_timeout_s
        answered, last = False, "no answer"
        await progress(SERVER_STEPS[1], 10)
        while True:
            if process.returncode is not None:
                raise DriverError(
                    f"the server {_exit_status(process.returncode)} before it was ready{self._last_output(reservation)}"
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DriverError(
                    f"the server was not ready within {serve.startup_timeout_s:g} s (GET {serve.health_path} on "
                    f"{HOST}:{port}: {last}){self._last_output(reservation)}"
                )
            status = await health_status(port, serve.health_path, timeout=min(PROBE_TIMEOUT_S, remaining))
            if status == 200:
                return
            if status is not None:
                last = f"HTTP {status}"
                if not answered:
                    answered = True
                    await progress(SERVER_STEPS[1], 50)
            await asyncio.sleep(min(READY_POLL_S, max(0.0, deadline - loop.time())))

    async def _exit_words(self, reservation: str) -> str:
        process = self._children.get(reservation)
        if process is None:
            return "exited"  # started before an agent restart: its status went to the agent before
        with contextlib.suppress(TimeoutError):  # gone from /proc; the child watcher reaps it in a moment
            async with asyncio.timeout(KILL_WAIT_S):
                await process.wait()
        return "exited" if process.returncode is None else _exit_status(process.returncode)

    def _last_output(self, reservation: str) -> str:
        """The last line the workload wrote, for the error: why a replica failed is usually there."""
        try:
            with open(self._workdir(reservation) / "output.log", "rb") as output:
                output.seek(0, os.SEEK_END)
                output.seek(max(0, output.tell() - OUTPUT_TAIL_BYTES))
                return _last_line(output.read())
        except OSError:
            return ""

    # --- Processes ---

    async def _stop(self, reservation: str) -> tuple[Workload | None, bool]:
        """Stop the reservation's group and forget it: (what was recorded, whether anything still ran)."""
        registry = self._registry()
        workload = registry.pop(reservation, None)
        stopped = False
        if workload is not None:
            stopped = await _stop_group(workload.group, self._grace)
            self._save(registry)
        process = self._children.pop(reservation, None)
        if process is not None:
            await process.wait()
        self._failed_checks.pop(reservation, None)
        return workload, stopped

    @staticmethod
    def _live(registry: dict[str, Workload]) -> dict[str, Gpus]:
        """A workload whose processes have all exited holds no GPU any more, released or not."""
        return {reservation: held.gpus for reservation, held in registry.items() if _group_alive(held.group)}

    def _workdir(self, reservation: str) -> Path:
        return self._state_dir / "workloads" / reservation

    async def _start(
        self, reservation: str, command: list[str], visibility: dict[str, str], *, secret: str | None = None
    ) -> asyncio.subprocess.Process:
        """A server (``secret`` given) also finds the agent's own programs first on its PATH: the model
        server, ``neocloud-serve``, is installed beside ``neocloud-agent`` (its ``serving`` extra)."""
        workdir = ensure_state_dir(self._workdir(reservation))
        path = WORKLOAD_PATH if secret is None else f"{sysconfig.get_path('scripts')}:{WORKLOAD_PATH}"
        environment = {"PATH": path, "HOME": str(workdir), "LANG": "C.UTF-8", **visibility}
        environment[MARKER] = reservation
        if secret is not None:
            environment[SECRET_ENV] = secret
        return await spawn_logged(
            command, log=workdir / "output.log", cwd=workdir, env=environment, what="the workload"
        )

    def _registry(self) -> dict[str, Workload]:
        """The recorded workloads. One recorded by an agent before GPU slices is a bare group id: its
        reservation held the whole node."""
        recorded = read_json(self._state_dir / REGISTRY) or {}
        whole_node = tuple(range(self._gpu_count))
        return {
            reservation: Workload(group=entry, gpus=whole_node)
            if isinstance(entry, int)
            else Workload(
                group=entry["group"],
                gpus=tuple(entry["gpus"]),
                port=entry.get("port"),
                health_path=entry.get("health_path"),
            )
            for reservation, entry in recorded.items()
        }

    def _save(self, registry: dict[str, Workload]) -> None:
        ensure_state_dir(self._state_dir)
        recorded = {}
        for reservation, workload in registry.items():
            entry: dict[str, Any] = {"group": workload.group, "gpus": list(workload.gpus)}
            if workload.port is not None:
                entry.update(port=workload.port, health_path=workload.health_path)
            recorded[reservation] = entry
        write_json_atomic(self._state_dir / REGISTRY, recorded)


def _command_of(params: Params, *, optional: bool) -> list[str] | None:
    """``params.command``; it may be absent (``optional``) when the reservation is logged into."""
    command = params.get("command")
    if command is None and optional:
        return None
    if not isinstance(command, list) or not command or not all(isinstance(arg, str) for arg in command):
        raise DriverError("params.command must be a non-empty list of strings")
    return command


def _last_line(output: bytes) -> str:
    lines = output.decode("utf-8", "replace").strip().splitlines()
    return f"; its last output: {lines[-1][-300:]!r}" if lines else ""


def _exit_status(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


def _signal_group(group: int, signum: int) -> bool:
    """Signal every process of the group; False when none is left."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    return True


def group_members(group: int) -> list[int]:
    """Pids of the group's processes that still run. Not ``killpg(group, 0)``: that counts zombies too,
    and zombies linger wherever PID 1 does not reap orphans (many containers), yet they are dead."""
    if not PROC.is_dir():  # not Linux: fall back to the signal probe, zombies included
        return [group] if _signal_group(group, 0) else []
    members = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        state, _parent, process_group = stat[stat.rindex(")") + 2 :].split()[:3]  # the name may hold ") "
        if int(process_group) == group and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _group_alive(group: int) -> bool:
    return bool(group_members(group))


async def _wait_gone(group: int, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while _group_alive(group):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


async def _stop_group(group: int, grace: float) -> bool:
    """SIGTERM to the whole group, SIGKILL to what is left after ``grace``; False if it had already gone."""
    if not _group_alive(group):
        return False
    _signal_group(group, signal.SIGTERM)
    if await _wait_gone(group, grace):
        return True
    _signal_group(group, signal.SIGKILL)
    if not await _wait_gone(group, KILL_WAIT_S):
        raise DriverError(f"the workload's process group {group} survived SIGKILL")
    return True
