"""The agent installs alone on a GPU host: it imports only the standard library, websockets, asyncssh (and
cryptography, which asyncssh needs: the SSH access of reservations) and (lazily) pynvml, and nothing of
Django or the rest of the project. Its model server (``serving``) needs the
``serving`` extra (torch and the rest), which the agent itself never imports: it reads only the names
in the serving package's ``__init__``."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import provisioning.agent

AGENT = Path(provisioning.agent.__file__).parent
ROOT = AGENT.parent.parent
SERVING = AGENT / "serving"
THIRD_PARTY = {"asyncssh", "cryptography", "pynvml", "websockets"}
SERVING_THIRD_PARTY = {"numpy", "sentence_transformers", "torch", "transformers", "uvicorn"}
FORBIDDEN = ("django", "rest_framework", "channels", "console", "marketplace")


def needs_the_serving_extra(path: Path) -> bool:
    return path.is_relative_to(SERVING) and path != SERVING / "__init__.py"


def agent_modules() -> list[str]:
    """Every module of the agent but the model server's own (its package's ``__init__`` included)."""
    return sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in AGENT.rglob("*.py")
        if not needs_the_serving_extra(path)
    )


def test_importing_every_agent_module_loads_nothing_of_django_or_the_project():
    script = (
        "import importlib, json, sys\n"
        f"for name in {agent_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True, env={"PATH": ""}
    )
    loaded = json.loads(completed.stdout)

    assert "provisioning.agent.cli" in loaded and "provisioning.agent.backends.nvml" in loaded
    assert [name for name in loaded if name.split(".")[0] in FORBIDDEN] == []
    assert [
        name for name in loaded if name.startswith("provisioning.") and not name.startswith("provisioning.agent")
    ] == []
    assert "pynvml" not in loaded, "pynvml is imported only when the NVML backend starts"
    assert "provisioning.agent.drivers.process" in loaded and "provisioning.agent.serving" in loaded
    assert [name for name in loaded if name.split(".")[0] in SERVING_THIRD_PARTY] == []
    assert [name for name in loaded if name.startswith("provisioning.agent.serving.")] == []


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def allowed(module: str, path: Path) -> bool:
    top = module.split(".")[0]
    if needs_the_serving_extra(path) and top in SERVING_THIRD_PARTY:
        return True
    if module.startswith("provisioning.agent.serving.") and not path.is_relative_to(SERVING):
        return False  # the rest of the agent runs without the extra
    return top in sys.stdlib_module_names or top in THIRD_PARTY or module.startswith("provisioning.agent")


def test_agent_files_import_only_the_standard_library_their_dependencies_and_the_agent():
    """The model server's files may also import the serving extra's packages; no other file of the
    agent imports the model server's modules."""
    offending = {
        str(path.relative_to(ROOT)): sorted(module for module in imported_modules(path) if not allowed(module, path))
        for path in AGENT.rglob("*.py")
    }
    assert {path: modules for path, modules in offending.items() if modules} == {}


def test_the_agent_reads_nothing_outside_its_package_at_run_time():
    """The simulated profile ships inside the package; ../shared is read only by derive.py, by hand."""
    mentions = [
        str(path.relative_to(ROOT))
        for path in AGENT.rglob("*.py")
        if "shared" in path.read_text(encoding="utf-8") and path.name != "derive.py"
    ]
    assert mentions == []
    assert (AGENT / "profiles" / "h100-sxm-80gb.json").is_file()
