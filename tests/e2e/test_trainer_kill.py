"""The batch layer killed with SIGKILL: during a checkpoint write and during training."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from core.synthetic import SyntheticMusic
from services.batch.checkpoint import PlayMatrix
from services.infra import kafka_admin as kafka_io
from services.infra.checked_files import temp_path
from services.infra.settings import Settings
from services.produce import PlayPublisher
from tests.e2e.test_foldin_kill import _env
from tests.integration.helpers import wait_for

pytestmark = pytest.mark.e2e

# A child that keeps adding deterministic plays (offset o → user, track, weight) and
# checkpointing, so a kill lands mid-write most of the time.
_WRITER = """
import sys
from services.batch.checkpoint import PlayMatrix
path = sys.argv[1]
pm = PlayMatrix.load(path)
o = pm.applied("inc", 0) + 1
while True:
    for _ in range(20000):
        pm.add("inc", 0, o, f"u{o % 4999}", f"t{(o * 31) % 2999}", float(1 + o % 3))
        o += 1
    pm.save(path, float(o))
"""


def _expected(upto: int) -> Counter[tuple[str, str]]:
    c: Counter[tuple[str, str]] = Counter()
    for o in range(upto + 1):
        c[(f"u{o % 4999}", f"t{(o * 31) % 2999}")] += 1 + o % 3
    return c


def _as_counter(pm: PlayMatrix) -> Counter[tuple[str, str]]:
    coo = pm.matrix().tocoo()
    return Counter(
        {(pm.user_ids[r], pm.track_ids[c]): float(v) for r, c, v in zip(coo.row, coo.col, coo.data, strict=True)}
    )


def test_kill9_during_checkpoint_writes_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.npz"
    rng = random.Random(5)
    mid_write, rounds = 0, 0
    while rounds < 4 or (mid_write < 2 and rounds < 30):
        rounds += 1
        before = path.stat().st_mtime_ns if path.exists() else 0
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], cwd=Path(__file__).parents[2])
        # Wait until the child is in its add/save loop (one save done), then kill at a random moment.
        assert wait_for(lambda b=before: path.exists() and path.stat().st_mtime_ns != b, timeout=60, every=0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        child.send_signal(signal.SIGKILL)
        child.wait()
        tmp = temp_path(path)
        mid_write += tmp.exists()
        pm = PlayMatrix.load(path)  # the last complete checkpoint
        upto = pm.applied("inc", 0)
        assert upto >= 0
        assert _as_counter(pm) == _expected(upto)  # exactly the plays its offsets cover
        tmp.unlink(missing_ok=True)
    assert mid_write >= 2, f"only {mid_write} of {rounds} kills landed during a write"


def test_kill9_during_training_then_restart_recovers_the_exact_matrix(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    data = SyntheticMusic(n_users=3000, n_tracks=1500, mean_plays=30, seed=8)
    kafka_io.ensure_topics(settings)
    env = _env(settings)
    env["ENCORE_ITERATIONS"] = "400"  # long enough to be killed while training
    env["ENCORE_FACTORS"] = "64"
    pub = PlayPublisher.connect(settings.kafka_bootstrap, settings.plays_topic)
    expected: Counter[tuple[str, str]] = Counter()
    events = list(data.events(30_000))

    def produce(evs: list[dict[str, object]]) -> None:
        for ev in evs:
            pub.publish(str(ev["user_id"]), str(ev["track_id"]), ts=float(str(ev["ts"])), count=2)
            expected[(str(ev["user_id"]), str(ev["track_id"]))] += 2
        pub.flush()

    produce(events[:20_000])
    log = tmp_path / "train.log"
    cmd = [sys.executable, "-m", "services.cli", "train", "--once"]
    with open(log, "ab") as out:
        first = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    ckpt = Path(settings.data_dir) / "checkpoint.npz"
    assert wait_for(lambda: ckpt.exists() and "checkpoint:" in log.read_text(), timeout=120)
    time.sleep(1.0)  # inside engine.fit now
    assert first.poll() is None, log.read_text()[-2000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert redis_client.get(f"{settings.key_prefix}model:current") is None  # nothing was published

    produce(events[20_000:])  # plays keep coming while the trainer is down
    env["ENCORE_ITERATIONS"] = "2"
    done = subprocess.run(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, timeout=300)  # noqa: SIM115
    assert done.returncode == 0, log.read_text()[-2000:]
    pub.close()
    assert _as_counter(PlayMatrix.load(ckpt)) == expected
    assert redis_client.get(f"{settings.key_prefix}model:current") is not None
