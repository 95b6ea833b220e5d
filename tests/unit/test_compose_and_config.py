"""The compose file names only real subcommands and settings; the settings loader is strict."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import COMMANDS
from services.cli import build_parser as _parser
from services.infra.settings import ConfigError, Settings

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())


def test_compose_commands_and_settings_are_real() -> None:
    doc = _compose()
    known = {name for name, _, _ in Settings().describe()}
    encore_services = {n: s for n, s in doc["services"].items() if "build" in s}
    assert set(encore_services) == {"train", "foldin", "serve", "produce"}
    for name, svc in encore_services.items():
        cmd = svc["command"]
        assert cmd[0] in COMMANDS, name
        _parser().parse_args(cmd)  # exits on an unknown flag
        for var in svc["environment"]:
            assert var in known, f"{name}: {var} is not a setting"
    assert doc["services"]["redis"]["command"][1:3] == ["--appendonly", "yes"]


def test_settings_from_env() -> None:
    s = Settings.from_env(
        {
            "ENCORE_FACTORS": "32",
            "ENCORE_SOLVER": "cholesky",
            "ENCORE_REDIS_URL": "redis://user:secret@host:6379/0",
        }
    )
    assert s.factors == 32 and s.solver == "cholesky"
    shown = dict((n, v) for n, v, _ in s.describe())
    assert "secret" not in shown["ENCORE_REDIS_URL"] and "host:6379" in shown["ENCORE_REDIS_URL"]


@pytest.mark.parametrize(
    "env, msg",
    [
        ({"ENCORE_FACTROS": "8"}, "unknown setting"),
        ({"ENCORE_FACTORS": "many"}, "expected int"),
        ({"ENCORE_FACTORS": "0"}, ">= 1"),
        ({"ENCORE_SOLVER": "lu"}, "one of"),
        ({"ENCORE_PLAYS_TOPIC": ""}, "must not be empty"),
    ],
)
def test_bad_settings_rejected(env: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        Settings.from_env(env)


def test_api_keys_are_masked_and_a_missing_key_file_is_a_clear_error(tmp_path) -> None:
    from services.serving.auth import KeyRing

    s = Settings.from_env(
        {"ENCORE_API_KEYS": "k-one,k-two", "ENCORE_ADMIN_API_KEYS": "adm-secret", "ENCORE_REDIS_PASSWORD": "rpw"}
    )
    shown = {name: value for name, value, _ in s.describe()}
    assert "rpw" not in shown["ENCORE_REDIS_PASSWORD"]
    assert shown["ENCORE_API_KEYS"] == "*** (2 set)" and "adm-secret" not in shown["ENCORE_ADMIN_API_KEYS"]
    with pytest.raises(ConfigError, match="nope.keys"):
        KeyRing("", str(tmp_path / "nope.keys"))
    ring = KeyRing(" a , b ,", "")
    assert ring.holds(b"a") and ring.holds(b"b") and not ring.holds(b"") and not ring.holds(b"ab")
