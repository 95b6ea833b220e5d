"""The architecture's rules, checked: imports point down the layers, importing connects to
nothing and sets nothing process-wide, and domain errors become exit codes only at the edge."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import CheckpointMismatchError, FatalError, ModelRejectedError, UnknownVersionError
from services import cli
from services.cli import commands

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
# A layer may import itself and the layers after it in this list, never one before it.
ORDER = ["services.cli", "services.speed|services.batch|services.serving", "services.infra", "core"]


def _layer(module: str) -> int | None:
    for i, names in enumerate(ORDER):
        if any(module == n or module.startswith(n + ".") for n in names.split("|")):
            return i
    return None


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_imports_point_down_the_layers() -> None:
    bad = []
    for path in sorted([*ROOT.glob("core/**/*.py"), *ROOT.glob("services/*/**/*.py")]):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mine = _layer(module)
        assert mine is not None, module
        sibling_layers = set(ORDER[mine].split("|"))
        for imported in _imports(path):
            theirs = _layer(imported)
            if theirs is None and imported.startswith("services"):
                bad.append(f"{module} imports {imported} (outside every layer)")
            elif theirs is not None and theirs < mine:
                bad.append(f"{module} imports {imported} (a layer above)")
            elif theirs == mine and len(sibling_layers) > 1:
                own = next(n for n in sibling_layers if module.startswith(n))
                if not imported.startswith(own):
                    bad.append(f"{module} imports {imported} (a sibling layer)")
    assert bad == []


def test_core_imports_no_io_library() -> None:
    io = ("redis", "kafka", "confluent_kafka", "fastapi", "uvicorn", "services")
    for path in ROOT.glob("core/*.py"):
        hits = [m for m in _imports(path) if m.split(".")[0] in io]
        assert hits == [], f"{path.name} imports {hits}"


def test_importing_every_module_connects_to_nothing_and_sets_nothing() -> None:
    """In a clean interpreter with no servers: every module imports, no socket is opened, no
    process-wide setting (environment, switch interval) changes."""
    modules = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in sorted(ROOT.glob("services/**/*.py"))
        if p.name != "__main__.py"
    ]
    code = f"""
import os, socket, sys, importlib
before_env, before_si = dict(os.environ), sys.getswitchinterval()
def refuse(*a, **k):
    raise AssertionError("connected at import time")
socket.socket.connect = refuse
for m in {modules!r}:
    importlib.import_module(m)
assert dict(os.environ) == before_env, set(os.environ) ^ set(before_env)
assert sys.getswitchinterval() == before_si
print("ok", len({modules!r}))
"""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


@pytest.mark.parametrize(
    "error, code, says",
    [
        (CheckpointMismatchError("built with a half-life of 86400 s"), 2, "half-life"),
        (ModelRejectedError("precision below the guard"), 2, "guard"),
        (UnknownVersionError("version v9 is not in Redis"), 2, "v9"),
        (FatalError("batch: ResponseError: script error"), 3, "stopped"),
    ],
)
def test_domain_errors_become_exit_codes_and_messages(monkeypatch, capsys, error, code, says) -> None:
    def handler(_s, _a):
        raise error

    monkeypatch.setitem(commands.HANDLERS, "config", handler)
    assert cli.main(["config"]) == code
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_a_user_mistake_gets_a_message_not_a_traceback(monkeypatch, capsys) -> None:
    monkeypatch.setenv("ENCORE_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    monkeypatch.setenv("ENCORE_REDIS_URL", "redis://127.0.0.1:1/0")
    assert cli.main(["produce"]) == 2  # neither --file nor --synthetic
    assert "exactly one of --file" in capsys.readouterr().err
    monkeypatch.setenv("ENCORE_FACTORS", "lots")
    assert cli.main(["config"]) == 2
    assert "ENCORE_FACTORS" in capsys.readouterr().err
