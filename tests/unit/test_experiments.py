"""Arms of an A/B experiment: parsing, and assignment that is stable and near the shares."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from core.errors import ConfigError
from core.experiments import Experiment


def test_assignment_follows_the_shares_and_is_stable() -> None:
    exp = Experiment.parse("ab1:current=90,candidate=10")
    assert exp is not None and exp.arms == (("current", 0.9), ("candidate", 0.1))
    users = [f"user-{i}" for i in range(100_000)]
    counts = Counter(exp.arm_of(u) for u in users)
    assert abs(counts["candidate"] / len(users) - 0.1) < 0.005  # 0.005 ≈ 5 standard deviations
    again = Experiment.parse("ab1: current=90, candidate=10")
    assert again is not None and all(exp.arm_of(u) == again.arm_of(u) for u in users[:5000])


def test_assignment_is_the_same_in_another_process() -> None:
    """No per-process hash seed: replicas and restarts agree."""
    code = "from core.experiments import Experiment; e = Experiment.parse('x:a=1,b=1,c=2'); "
    code += "print(''.join(e.arm_of(f'u{i}') for i in range(200)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    exp = Experiment.parse("x:a=1,b=1,c=2")
    assert exp is not None and out == "".join(exp.arm_of(f"u{i}") for i in range(200))


def test_another_experiment_reshuffles_users() -> None:
    a, b = Experiment.parse("one:x=50,y=50"), Experiment.parse("two:x=50,y=50")
    assert a is not None and b is not None
    same = sum(a.arm_of(f"u{i}") == b.arm_of(f"u{i}") for i in range(20_000)) / 20_000
    assert 0.47 < same < 0.53  # independent halves agree half of the time


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("current=50,candidate=50", "expected NAME:ARM=SHARE"),
        ("ab:current=50", "at least two arms"),
        ("ab:current=50,current=50", "named twice"),
        ("ab:current=0,candidate=1", "share > 0"),
        ("ab:current=x,candidate=1", "share > 0"),
        ("ab:current=nan,candidate=1", "share > 0"),
        ("bad name:current=1,candidate=1", "expected NAME:ARM=SHARE"),
    ],
)
def test_bad_experiments_get_a_message(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Experiment.parse(spec)


def test_no_experiment_when_empty() -> None:
    assert Experiment.parse("") is None and Experiment.parse("  ") is None
