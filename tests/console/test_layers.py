"""The layers are the map (ARCHITECTURE, Layers; pyproject's [tool.importlinter]): `make lint` runs
`lint-imports`, and these tests show it refuses what it should, on a copy of the tree."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from django.conf import settings

ROOT = Path(settings.BASE_DIR)
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _contract(type_: str) -> dict:
    return next(c for c in CONTRACTS if c["type"] == type_)


def _modules(package: str, *, but: str) -> set[str]:
    return {
        f"{package}.{p.stem}"
        for p in (ROOT / package).iterdir()
        if p.name not in ("__init__.py", but) and (p.suffix == ".py" or (p / "__init__.py").exists())
    }


def test_every_module_of_console_but_the_kernel_is_in_the_top_layer():
    top = {name.strip() for name in _contract("layers")["layers"][0].replace("|", ":").split(":")}
    assert top == _modules("console", but="kernel")


def test_every_module_of_provisioning_but_the_agent_is_forbidden_to_the_agent():
    agent = next(c for c in CONTRACTS if c.get("source_modules") == ["provisioning.agent"])
    assert _modules("provisioning", but="agent") <= set(agent["forbidden_modules"])


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("tree")
    for package in ("console", "marketplace", "provisioning"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    return copy


def lint(tree: Path, *, add: tuple[str, str] | None = None) -> subprocess.CompletedProcess:
    """lint-imports on the copy, with one line appended to one module (then taken out again)."""
    target = original = None
    if add:
        target = tree / add[0]
        original = target.read_text()
        target.write_text(original + "\n" + add[1] + "\n")
    try:
        return subprocess.run(
            [str(LINT_IMPORTS), "--no-cache"],
            cwd=tree,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        if target is not None:
            target.write_text(original)


def test_the_tree_as_it_is_keeps_every_contract(tree):
    result = lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


@pytest.mark.parametrize(
    "module,line,broken",
    [
        ("provisioning/services/fleet.py", "import marketplace.models", "Layers"),  # provisioning sees marketplace
        ("console/kernel/errors.py", "import provisioning.models", "The kernel imports no app"),
        ("provisioning/agent/client.py", "import django.conf", "The node agent stands alone"),
        (  # a cycle hidden inside a function is a cycle
            "marketplace/services/billing/ledger.py",
            "def _hidden():\n    from marketplace.services.billing import credits  # noqa\n",
            "No import cycle",
        ),
    ],
)
def test_a_forbidden_import_fails_the_lint(tree, module, line, broken):
    result = lint(tree, add=(module, line))
    assert result.returncode != 0
    broken_section = result.stdout.split("Broken contracts", 1)[-1]
    assert broken in broken_section, result.stdout
