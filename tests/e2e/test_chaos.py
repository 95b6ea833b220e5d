"""The chaos soak, small: every fault once while plays stream and the API answers.

Runs `python -m bench.chaos --small` (real broker, Redis and `encore` processes) and checks what
must hold whatever the timing: no play lost, none counted twice, every malformed event in the
dead-letter topic exactly once, fresh plays folded in again after every fault, no 5xx but the
documented 503, and no request left unanswered but one the SIGKILLed serve worker was holding.
Figures (availability, p99, recovery times) are reported by the bench, not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_small_chaos_soak_loses_nothing_and_counts_nothing_twice(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--small", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "chaos_small.json").read_text())
    assert r["caught_up"]
    assert r["histories"]["users_checked"] > 1000
    assert r["histories"]["lost_plays"] == 0 and r["histories"]["doubled_plays"] == 0, r["histories"]
    letters = r["dead_letters"]
    assert letters["malformed_sent"] > 0 and letters["missing"] == 0 and letters["duplicates"] == 0, letters
    faults = [e["fault"] for e in r["faults"]]
    assert sorted(faults) == sorted(
        ["foldin", "train_mid_retrain", "serve_worker", "redis_kill", "redis_restore", "train_mid_checkpoint", "broker"]
    )
    assert all(e["freshness_recovered_s"] is not None for e in r["faults"]), r["faults"]
    serving = r["serving"]
    why = (serving["non_200_sample"], serving["errors_by_kind"], r["faults"])
    assert set(serving["answers_by_status"]) <= {"200", "503", "0"}, why
    # No answer at all (status 0) only for a request the SIGKILLed worker held at that moment;
    # a version roll retires workers gently and must lose none.
    kills = [e["at_s"] for e in r["faults"] if e["fault"] == "serve_worker"]
    unanswered = [t for t, status, _ in serving["non_200_sample"] if status == 0]
    assert len(unanswered) <= 4 and all(any(k - 0.5 <= t <= k + 1.0 for k in kills) for t in unanswered), why
    assert r["serving"]["answered_200"] > 0.9 * r["serving"]["requests"]
