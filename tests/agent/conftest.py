"""The node agent's tests run ``async def`` tests each in a fresh event loop (no plugin needed) and never
touch the database: the agent imports nothing of Django."""

import asyncio
import inspect
from pathlib import Path

import pytest

from tests.agent.harness import enrolled

ASYNC_TEST_TIMEOUT_S = 20


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**arguments), ASYNC_TEST_TIMEOUT_S))
    return True


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """An enrolled node's state directory."""
    return enrolled(tmp_path / "state")
