"""Exact top-N, evaluation metrics and the synthetic generator."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from core.evaluation import holdout_split, ranking_metrics, time_split
from core.recommend import similar_items, top_n, top_of_scores
from core.synthetic import SKIP_MS, SyntheticMusic

pytestmark = pytest.mark.unit


_FORK_AFTER_SERIAL = """
import os, numpy as np
from core.recommend import top_of_scores
s = np.random.default_rng(0).random((64, 300), dtype=np.float32)
top_of_scores(s, 10, threads=False)  # the serve parent tuning its graphs
pid = os.fork()
if pid == 0:  # a worker: the threaded kernels must still work here
    top_of_scores(s, 10, threads=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child", status)
"""


def test_a_parent_using_the_serial_kernel_can_fork_workers_that_use_threads(tmp_path) -> None:
    """Even when the threaded kernel is in numba's disk cache first (CI's order: the trainer
    evaluates before a serve parent tunes), the serial one must not start GNU OpenMP: a worker
    forked afterwards was killed on its first threaded call and the parent re-forked forever."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    warm = "import numpy as np; from core.recommend import top_of_scores; "
    warm += "top_of_scores(np.random.default_rng(1).random((64, 300), dtype=np.float32), 10)"
    subprocess.run([sys.executable, "-c", warm], env=env, check=True, timeout=300)
    out = subprocess.run(
        [sys.executable, "-c", _FORK_AFTER_SERIAL], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "child 0" in out.stdout, out.stdout + out.stderr


def test_top_n_excludes_and_orders() -> None:
    items = np.diag(np.arange(1, 6, dtype=np.float32))  # item i scores i+1 on axis i
    user = np.ones((1, 5), dtype=np.float32)
    excl = sp.csr_matrix(([1.0], ([0], [4])), shape=(1, 5))
    idx, scores = top_n(user, items, 3, exclude=excl)
    assert idx[0].tolist() == [3, 2, 1]
    assert scores[0].tolist() == [4.0, 3.0, 2.0]
    idx, _ = top_n(user, items, 10, exclude=excl)
    assert idx[0].tolist() == [3, 2, 1, 0, -1]
    with pytest.raises(ValueError):
        top_n(user, items, 0)


@pytest.mark.parametrize("threads", [True, False])  # False: the serial kernel a serve parent tunes with
@pytest.mark.parametrize("n", [1, 10, 128, 200])  # 200: the argpartition path
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_of_scores_matches_a_stable_full_sort(n, dtype, threads) -> None:
    rng = np.random.default_rng(0)
    s = rng.standard_normal((60, 3000)).astype(dtype)
    s[rng.random(s.shape) < 0.3] = -np.inf  # excluded entries
    s[5, :] = -np.inf  # nothing eligible
    s[6, 4:] = -np.inf  # fewer eligible than n
    s[7, :] = 1.0  # all tied: earlier columns first
    idx, val = top_of_scores(s, n, threads=threads)
    order = np.argsort(-s, axis=1, kind="stable")[:, :n]
    want_v = np.take_along_axis(s, order, axis=1)
    want_i = np.where(np.isfinite(want_v), order, -1)
    np.testing.assert_array_equal(val, want_v)
    if n <= 128:
        np.testing.assert_array_equal(idx, want_i)
    else:  # argpartition breaks ties arbitrarily; the scores still match
        np.testing.assert_array_equal(idx == -1, want_i == -1)


def test_similar_by_cosine_excludes_self() -> None:
    F = np.array([[1, 0], [10, 1], [0, 1], [-1, 0]], dtype=np.float32)
    idx, _ = similar_items(F, 0, 2)
    assert idx.tolist() == [1, 2]


def test_metrics_perfect_and_worst() -> None:
    train = sp.csr_matrix((2, 4), dtype=np.float32)
    test = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32))
    items = np.eye(4, dtype=np.float32)
    good = ranking_metrics(np.eye(4, dtype=np.float32)[:2], items, train, test, k=1)
    assert good.precision == 1.0 and good.ndcg == 1.0 and good.auc == 1.0 and good.epr == 0.0
    bad = ranking_metrics(-np.eye(4, dtype=np.float32)[:2], items, train, test, k=1)
    assert bad.precision == 0.0 and bad.auc == 0.0 and bad.epr == 1.0


def test_holdout_split_partitions_plays() -> None:
    m = SyntheticMusic(n_users=200, n_tracks=100, seed=0).matrix()
    train, test = holdout_split(m, fraction=0.3, seed=0)
    assert (train + test - m).nnz == 0
    assert train.multiply(test).nnz == 0
    assert 0.2 < test.nnz / m.nnz < 0.4


def test_time_split_is_causal() -> None:
    u, i = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 0])
    ts = np.array([1.0, 5.0, 2.0, 6.0])
    train, test = time_split(u, i, ts, np.ones(4, dtype=np.float32), 3.0, (2, 2))
    assert train.toarray().tolist() == [[1, 0], [1, 0]]
    assert test.toarray().tolist() == [[0, 1], [0, 0]]  # user 1 replayed a train track


def test_synthetic_is_deterministic_and_shaped() -> None:
    a = SyntheticMusic(n_users=500, n_tracks=300, seed=7)
    b = SyntheticMusic(n_users=500, n_tracks=300, seed=7)
    assert (a.matrix() != b.matrix()).nnz == 0
    lg = a.log()
    assert np.all(np.diff(lg.ts) >= 0)
    skips = lg.ms_played < SKIP_MS
    assert 0.1 < skips.mean() < 0.2
    m = a.matrix()
    assert m.sum() == (~skips).sum()
    listeners = np.sort(np.asarray((m > 0).sum(axis=0)).ravel())[::-1]
    assert listeners[:10].mean() > 10 * listeners[-100:].mean()  # long tail
    assert m.max() > 3  # repeat plays
    late = a.user_join > 0
    assert late.any() and lg.ts[lg.user == np.flatnonzero(late)[-1]].min() > a.start_ts
    ev = next(a.events())
    assert set(ev) >= {"user_id", "track_id", "ts", "ms_played", "count"}


def test_popular_fallback_scores_are_the_share_of_users_who_played_a_track() -> None:
    import json

    import scipy.sparse as sp

    from core.recommend import popularity
    from services.serving.snapshots import popular_of

    plays = sp.csr_matrix(
        [[3.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [2.0, 5.0, 1.0, 0.0], [0.0, 0.0, 7.0, 0.0]]
    )  # track 0: 3 listeners, track 2: 3, track 1: 1 (however many plays), track 3: none
    top, shares = popularity(plays, 3)
    assert top.tolist() == [0, 2, 1] and shares.tolist() == [0.75, 0.75, 0.25]
    meta = {"popular": json.dumps(["t0", "t2", "t1"]), "popular_scores": json.dumps(shares.tolist())}
    assert popular_of(meta, []) == [("t0", 0.75), ("t2", 0.75), ("t1", 0.25)]
    # A version published before shares were recorded: rank scores in (0, 1], still descending.
    assert popular_of({"popular": json.dumps(["a", "b"])}, []) == [("a", 1.0), ("b", 0.5)]
    # Since every track's share is recorded (factor-row order), the fallback holds every track,
    # so a filtered fallback can still fill n.
    by_row = np.zeros(4, dtype=np.float32)
    by_row[top] = shares
    full = popular_of(meta, ["t0", "t1", "t2", "t3"], by_row)
    assert full == [("t0", 0.75), ("t2", 0.75), ("t1", 0.25), ("t3", 0.0)]
