"""``neocloud-agent``: enrol a host, run its agent, run a simulated fleet, check the GPUs, or tear down
what agents left on a host.

    neocloud-agent enroll --server URL --token TOKEN [--hostname H] --state-dir DIR
    neocloud-agent run --server URL --state-dir DIR [--backend nvml|simulated] [--driver process|simulated]
                       [--access-listen ADDRESS] [--access-host HOST]
    neocloud-agent fleet --server URL --tokens FILE --state-dir DIR [--speed 1.0] [--fail-rate 0]
                         [--access-listen ADDRESS] [--access-host HOST]
    neocloud-agent gpu-check [--backend nvml]
    neocloud-agent teardown --state-dir DIR

Exit status: 0 done or stopped by SIGINT/SIGTERM; 1 failed (enrolment refused, not enrolled, state
directory busy, something a teardown could not remove); 2 bad usage or the GPU backend is unavailable
on this host; 3 the console refused this node's secret (enrol again).
"""

import argparse
import asyncio
import json
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from provisioning.agent import __version__
from provisioning.agent.backends import BACKENDS, BackendUnavailable, GpuBackend, get_backend
from provisioning.agent.client import AgentRefused, NodeAgent
from provisioning.agent.credentials import NotEnrolled, load_credentials
from provisioning.agent.drivers import DRIVERS, DriverError, HostDriver, get_driver
from provisioning.agent.enrollment import EnrollmentError, enroll, websocket_url
from provisioning.agent.fleet import FleetMember, load_members, run_fleet
from provisioning.agent.state import StateDirBusy
from provisioning.agent.teardown import locked, state_dirs_under, teardown

logger = logging.getLogger("neocloud-agent")

EXIT_FAILED = 1
EXIT_UNAVAILABLE = 2
EXIT_REFUSED = 3


class _Failure(Exception):
    """A clean, expected failure: its message is printed without a traceback."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


def _server(value: str) -> str:
    try:
        websocket_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neocloud-agent", description="The Neocloud node agent.")
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    simulation = argparse.ArgumentParser(add_help=False)
    simulation.add_argument("--gpus", type=int, default=8, help="GPUs per simulated node")
    simulation.add_argument("--speed", type=float, default=1.0, help="simulated provisioning speed factor")
    simulation.add_argument("--fail-rate", type=float, default=0.0, help="share of simulated provisionings that fail")

    access = argparse.ArgumentParser(add_help=False)
    access.add_argument(
        "--access-listen",
        metavar="ADDRESS",
        help="the address reservations' SSH servers listen on (process driver: 0.0.0.0; simulated: 127.0.0.1)",
    )
    access.add_argument(
        "--access-host",
        metavar="HOST",
        help="the address tenants are told to connect to (process driver: this host's FQDN; simulated: 127.0.0.1)",
    )

    enroll_cmd = commands.add_parser("enroll", help="trade a bootstrap token for this node's secret")
    enroll_cmd.add_argument("--server", type=_server, required=True, help="the console, http(s)://host[:port]")
    enroll_cmd.add_argument("--token", required=True, help="the one-time bootstrap token")
    enroll_cmd.add_argument("--hostname", default=socket.gethostname(), help="this node's hostname")
    enroll_cmd.add_argument("--state-dir", type=Path, required=True)
    enroll_cmd.set_defaults(handler=_enroll)

    run_cmd = commands.add_parser("run", parents=[simulation, access], help="run this node's agent")
    run_cmd.add_argument("--server", type=_server, required=True)
    run_cmd.add_argument("--state-dir", type=Path, required=True)
    run_cmd.add_argument("--backend", choices=sorted(BACKENDS), default="nvml")
    run_cmd.add_argument("--driver", choices=sorted(DRIVERS), default="process")
    run_cmd.set_defaults(handler=_run)

    fleet_cmd = commands.add_parser(
        "fleet", parents=[simulation, access], help="run many simulated nodes in one process"
    )
    fleet_cmd.add_argument("--server", type=_server, required=True)
    fleet_cmd.add_argument(
        "--tokens",
        type=Path,
        required=True,
        help='JSON [{"hostname": ..., "token": ...|null}] (create_node_token --json)',
    )
    fleet_cmd.add_argument("--state-dir", type=Path, required=True, help="one sub-directory per node")
    fleet_cmd.add_argument("--backend", choices=sorted(BACKENDS), default="simulated")
    fleet_cmd.add_argument("--driver", choices=sorted(DRIVERS), default="simulated")
    fleet_cmd.set_defaults(handler=_fleet)

    check_cmd = commands.add_parser("gpu-check", help="print the inventory, one sample and per-call costs")
    check_cmd.add_argument("--backend", choices=sorted(BACKENDS), default="nvml")
    check_cmd.add_argument("--gpus", type=int, default=8, help="GPUs of the simulated backend")
    check_cmd.add_argument("--calls", type=int, default=200, help="calls per reading when measuring costs")
    check_cmd.set_defaults(handler=_gpu_check)

    teardown_cmd = commands.add_parser(
        "teardown", help="stop every workload and release every SSH access the agents under a directory recorded"
    )
    teardown_cmd.add_argument(
        "--state-dir", type=Path, required=True, help="an agent's state directory, or a fleet's (one per node)"
    )
    teardown_cmd.set_defaults(handler=_teardown)
    return parser


def _backend(args: argparse.Namespace, hostname: str, member: FleetMember | None = None) -> GpuBackend:
    if args.backend != "simulated":
        return get_backend(args.backend)
    if member is None:
        return get_backend("simulated", hostname=hostname, gpus=args.gpus)
    return get_backend(
        "simulated",
        hostname=hostname,
        gpus=member.gpus or args.gpus,
        gpu_name=member.gpu_name,
        memory_mib=member.gpu_memory_mib,
        power_limit_w=member.gpu_power_limit_w,
    )


def _driver(args: argparse.Namespace, state_dir: Path, seed: str, backend: GpuBackend) -> HostDriver:
    """The host driver, told how many GPUs the backend sees so it refuses GPUs the host does not have. The
    simulated one gets the state directory too: it runs replicas' servers (``params.serve``) and SSH
    access for real; and the GPUs themselves, which its sessions' stand-in nvidia-smi lists."""
    inventory = backend.inventory().gpus
    access = {
        option: value
        for option, value in (("access_listen", args.access_listen), ("access_host", args.access_host))
        if value is not None
    }
    if args.driver == "process":
        return get_driver("process", state_dir=state_dir, gpu_count=len(inventory), **access)
    return get_driver(
        "simulated",
        gpu_count=len(inventory),
        speed=args.speed,
        fail_rate=args.fail_rate,
        seed=seed,
        state_dir=state_dir,
        inventory=inventory,
        **access,
    )


async def _until_signalled(work: Callable[[], Awaitable[None]]) -> None:
    """Run ``work`` until it ends or SIGINT/SIGTERM arrives; a signal cancels it, which is a clean stop."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work())
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        logger.info("stopped by signal")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _enroll(args: argparse.Namespace) -> int:
    try:
        enrollment = enroll(server=args.server, token=args.token, hostname=args.hostname, state_dir=args.state_dir)
    except EnrollmentError as exc:
        raise _Failure(f"enrolment failed: {exc}") from None
    print(f"enrolled as {enrollment.node}; the secret is stored in {args.state_dir}")
    return 0


def _run(args: argparse.Namespace) -> int:
    try:
        node = load_credentials(args.state_dir).node
    except NotEnrolled as exc:
        raise _Failure(str(exc)) from None
    backend = _backend(args, node)
    try:
        agent = NodeAgent(
            server=args.server,
            state_dir=args.state_dir,
            backend=backend,
            driver=_driver(args, args.state_dir, node, backend),
        )
        asyncio.run(_until_signalled(agent.run))
    except AgentRefused as exc:
        raise _Failure(f"{exc}; enrol this host again", EXIT_REFUSED) from None
    finally:
        backend.close()
    return 0


def _fleet(args: argparse.Namespace) -> int:
    try:
        members = load_members(args.tokens)
    except (OSError, ValueError) as exc:
        raise _Failure(f"cannot read the tokens file: {exc}", EXIT_UNAVAILABLE) from None
    backends: list[GpuBackend] = []

    def build_agent(member: FleetMember, state_dir: Path) -> NodeAgent:
        backend = _backend(args, member.hostname, member)
        backends.append(backend)
        driver = _driver(args, state_dir, member.hostname, backend)
        return NodeAgent(server=args.server, state_dir=state_dir, backend=backend, driver=driver)

    try:
        asyncio.run(
            _until_signalled(
                lambda: run_fleet(members, server=args.server, state_dir=args.state_dir, build_agent=build_agent)
            )
        )
    finally:
        for backend in backends:
            backend.close()
    return 0


def _gpu_check(args: argparse.Namespace) -> int:
    backend = _backend(args, socket.gethostname())
    try:
        inventory = backend.inventory()
        report = {
            "backend": backend.name,
            "driver_version": inventory.driver_version,
            "gpus": [asdict(gpu) for gpu in inventory.gpus],
            "sample": [asdict(reading) for reading in backend.sample()],
            "health": [asdict(health) for health in backend.health()],
            "call_cost_us": backend.call_costs(args.calls),
        }
    finally:
        backend.close()
    print(json.dumps(report, indent=2))
    return 0


def _teardown(args: argparse.Namespace) -> int:
    """One line per thing torn down; a second run finds nothing left."""
    if not args.state_dir.is_dir():
        raise _Failure(f"{args.state_dir} is not a directory")
    state_dirs = state_dirs_under(args.state_dir)
    try:
        with locked(state_dirs):
            torn_down = asyncio.run(_teardown_printed(state_dirs))
    except StateDirBusy as exc:
        raise _Failure(f"{exc}: stop it first (nothing was torn down)") from None
    except (DriverError, OSError) as exc:  # OSError: a state directory this user may not change (root's)
        raise _Failure(f"the teardown stopped: {exc}") from None
    if not torn_down:
        print(f"nothing to tear down under {args.state_dir}")
    return 0


async def _teardown_printed(state_dirs: Sequence[Path]) -> int:
    count = 0
    for state_dir in state_dirs:
        async for line in teardown(state_dir):
            print(line, flush=True)
            count += 1
    return count


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)-7s %(message)s")
    if args.log_level != "DEBUG":  # the agent logs its own state changes; one line per frame is noise
        logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except BackendUnavailable as exc:
        print(f"neocloud-agent: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except StateDirBusy as exc:
        print(f"neocloud-agent: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except _Failure as exc:
        print(f"neocloud-agent: {exc}", file=sys.stderr)
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
