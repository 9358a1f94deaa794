"""Tearing down what agents left on a host they have gone from for good (``neocloud-agent teardown``;
``make clean`` runs it on the demo's agents before deleting their directories): in each agent state
directory under a directory, every recorded workload is stopped and every recorded SSH access released
(server, sessions, account, files), as their releases would. Never while an agent runs on one of them:
it holds that directory's lock, and would go on with records torn down under it."""

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from provisioning.agent.credentials import FILENAME as CREDENTIALS
from provisioning.agent.drivers.access.manager import REGISTRY as ACCESS
from provisioning.agent.drivers.process import REGISTRY as WORKLOADS
from provisioning.agent.drivers.process import ProcessDriver
from provisioning.agent.state import LOCK, state_lock

STATE_FILES = (CREDENTIALS, LOCK, WORKLOADS, ACCESS)
# Only a workload recorded before GPU slices needs the node's GPU count, to say which GPUs it held:
# nothing a teardown reports.
ANY_GPU_COUNT = 0


def state_dirs_under(directory: Path) -> list[Path]:
    """``directory`` itself when it is an agent's state directory, else the ones just under it (a fleet's:
    one per node)."""
    if _is_state_dir(directory):
        return [directory]
    return sorted(child for child in directory.iterdir() if child.is_dir() and _is_state_dir(child))


def _is_state_dir(directory: Path) -> bool:
    return any((directory / name).exists() for name in STATE_FILES)


@contextmanager
def locked(state_dirs: Sequence[Path]) -> Iterator[None]:
    """Hold the lock of every one of ``state_dirs``, or none: StateDirBusy, naming the directory, when
    an agent holds one."""
    with ExitStack() as locks:
        for state_dir in state_dirs:
            locks.enter_context(state_lock(state_dir))
        yield


async def teardown(state_dir: Path) -> AsyncIterator[str]:
    """Tear down what the agent of ``state_dir`` recorded (its lock held); a line for each thing. The
    process driver's code, whichever driver the agent ran: the simulated one keeps its real workloads
    and accesses in the same records."""
    async for line in ProcessDriver(state_dir=state_dir, gpu_count=ANY_GPU_COUNT).teardown():
        yield f"{state_dir}: {line}"
