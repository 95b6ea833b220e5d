"""ImplicitALS on tiny matrices with known answers and on synthetic data."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from core import als_kernels
from core.als import ImplicitALS
from core.errors import DivergedError, InvalidPlaysError, NotFittedError
from core.evaluation import holdout_split, ranking_metrics
from core.recommend import popular_items
from core.synthetic import SyntheticMusic

pytestmark = pytest.mark.unit


def _tiny(seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(0.6, (30, 20)).astype(np.float32)
    dense[3] = 0  # a user with no plays
    return sp.csr_matrix(dense)


def test_cholesky_matches_dense_closed_form() -> None:
    m = _tiny()
    model = ImplicitALS(factors=5, iterations=0)
    conf = model._with_confidence(m)
    Y = np.random.default_rng(1).standard_normal((20, 5)).astype(np.float32)
    X = np.zeros((30, 5), dtype=np.float32)
    als_kernels.cholesky_half_step(conf.indptr, conf.indices, conf.data, Y, model._gram(Y, np.float64), X)
    ref = als_kernels.reference_half_step(conf.indptr, conf.indices, conf.data, Y, model.regularization)
    np.testing.assert_allclose(X, ref, rtol=1e-4, atol=1e-5)
    assert np.all(X[3] == 0)


@pytest.mark.parametrize("k", [5, 64])
def test_cg_converges_to_closed_form(k: int) -> None:
    """The CG kernel is compiled per factor count (k a constant): each one must solve."""
    m = _tiny()
    model = ImplicitALS(factors=k)
    conf = model._with_confidence(m)
    Y = np.random.default_rng(1).standard_normal((20, k)).astype(np.float32)
    X = np.zeros((30, k), dtype=np.float32)
    als_kernels.cg_half_step(conf.indptr, conf.indices, conf.data, Y, model._gram(Y, np.float32), X, 2 * k)
    ref = als_kernels.reference_half_step(conf.indptr, conf.indices, conf.data, Y, model.regularization)
    np.testing.assert_allclose(X, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gram_over_several_row_blocks_matches_float64(dtype: type) -> None:
    """FᵀF + λI is summed block by block; rows past the first block must count, once."""
    rows = 2 * als_kernels._GRAM_BLOCK + 123
    F = np.random.default_rng(2).standard_normal((rows, 8)).astype(np.float32)
    F64 = F.astype(np.float64)
    ref = F64.T @ F64 + 0.5 * np.eye(8)
    G = als_kernels.gram(F, 0.5, dtype)
    assert G.dtype == dtype
    tolerance = 1e-6 if dtype == np.float32 else 1e-12  # relative to the largest entry
    assert np.abs(G - ref).max() <= tolerance * np.abs(ref).max()


@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_loss_decreases(solver: str) -> None:
    m = _tiny()
    losses = []
    for it in range(1, 6):
        model = ImplicitALS(factors=4, iterations=it, solver=solver, random_state=3).fit(m)
        losses.append(model.loss(m))
    assert all(b <= a * 1.0001 for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < losses[0]


def test_fold_in_equals_explicit_half_step() -> None:
    m = _tiny()
    model = ImplicitALS(factors=6, iterations=5, solver="cholesky", random_state=0).fit(m)
    folded = model.fold_in_users(m[[0, 5, 7]])
    conf = model._with_confidence(m)
    ref = als_kernels.reference_half_step(
        conf.indptr, conf.indices, conf.data, model.item_factors_, model.regularization
    )
    np.testing.assert_allclose(folded, ref[[0, 5, 7]], rtol=1e-3, atol=1e-4)
    items = model.fold_in_items(m.T.tocsr()[[2]])
    ref_items = als_kernels.reference_half_step(
        *(lambda c: (c.indptr, c.indices, c.data))(model._with_confidence(m.T.tocsr())),
        model.user_factors_,
        model.regularization,
    )
    np.testing.assert_allclose(items[0], ref_items[2], rtol=1e-3, atol=1e-4)
    assert folded.dtype == np.float32


def test_one_listener_fold_in_equals_the_matrix_path_and_the_serial_kernel_the_parallel_one() -> None:
    m = _tiny()
    model = ImplicitALS(factors=6, iterations=5, solver="cholesky", random_state=0).fit(m)
    Y = model.item_factors_
    gram = Y.T.astype(np.float64) @ Y
    row = m[4]
    # the same plays given in pieces, with a repeat and a zero: they add up as the matrix does
    rows = np.concatenate([row.indices, row.indices[:1], [int(row.indices[-1])]])
    plays = np.concatenate([row.data, [0.0], [0.0]]).astype(np.float32)
    plays[0] -= 1.0
    plays[-2] = 1.0
    np.testing.assert_allclose(
        model.fold_in_one(rows, plays, Y, gram), model.fold_in(row, Y, gram=gram)[0], rtol=1e-5, atol=1e-6
    )
    assert not model.fold_in_one(np.array([3]), np.array([0.0]), Y, gram).any()  # no plays: zero
    with pytest.raises(InvalidPlaysError):
        model.fold_in_one(np.array([Y.shape[0]]), np.array([1.0]), Y, gram)
    with pytest.raises(InvalidPlaysError):
        model.fold_in_one(np.array([1]), np.array([-1.0]), Y, gram)
    conf = model._with_confidence(m)
    full = gram + model.regularization * np.eye(6)
    a, b = np.zeros((m.shape[0], 6), np.float32), np.zeros((m.shape[0], 6), np.float32)
    als_kernels.cholesky_half_step(conf.indptr, conf.indices, conf.data, Y, full, a)
    als_kernels.cholesky_rows_serial(conf.indptr, conf.indices, conf.data, Y, full, b)
    np.testing.assert_array_equal(a, b)


def test_zero_users_get_zero_vectors_and_factors_are_float32() -> None:
    model = ImplicitALS(factors=4, iterations=3, random_state=0).fit(_tiny())
    assert model.user_factors_.dtype == np.float32 and model.item_factors_.dtype == np.float32
    assert np.all(model.user_factors_[3] == 0)
    assert np.all(np.isfinite(model.user_factors_))


def test_factor_rows_start_on_cache_lines_and_alignment_does_not_change_the_fit() -> None:
    """The fit's factors are 64-byte aligned (a 256-byte row then spans 4 cache lines, not 5),
    from a random start and from a copied warm start, and a fit from unaligned starting
    factors gives the same numbers (alignment is a layout, not a different computation)."""
    plays = SyntheticMusic(n_users=300, n_tracks=200, seed=3).matrix()
    model = ImplicitALS(factors=64, iterations=2, random_state=0).fit(plays)
    for f in (model.user_factors_, model.item_factors_):
        assert f.ctypes.data % 64 == 0 and f.flags.c_contiguous and f.dtype == np.float32
    start = [np.zeros((n + 1) * 64, np.float32)[1 : 1 + n * 64].reshape(n, 64) for n in plays.shape]  # 4 bytes off
    for s, f in zip(start, (model.user_factors_, model.item_factors_), strict=True):
        s[...] = f
    assert start[0].ctypes.data % 64 != 0
    warm = ImplicitALS(factors=64, iterations=1).fit(plays, init=(start[0], start[1]))
    assert warm.user_factors_.ctypes.data % 64 == 0 and warm.item_factors_.ctypes.data % 64 == 0
    again = ImplicitALS(factors=64, iterations=1).fit(plays, init=(start[0].copy(), start[1].copy()), consume_init=True)
    np.testing.assert_array_equal(warm.user_factors_, again.user_factors_)
    np.testing.assert_array_equal(warm.item_factors_, again.item_factors_)


def test_confidence_functions() -> None:
    p = np.array([0.0, 1.0, 9.0])
    np.testing.assert_allclose(ImplicitALS(alpha=2, confidence="linear").confidence_of(p), [1, 3, 19])
    np.testing.assert_allclose(
        ImplicitALS(alpha=2, epsilon=1, confidence="log").confidence_of(p), 1 + 2 * np.log1p(p), rtol=1e-6
    )


def test_save_load_round_trip(tmp_path) -> None:
    model = ImplicitALS(factors=4, iterations=2, random_state=0).fit(_tiny())
    path = tmp_path / "m.npz"
    model.save(path, track_ids=np.array(["a", "b"]))
    back = ImplicitALS.load(path)
    np.testing.assert_array_equal(back.item_factors_, model.item_factors_)
    assert back.get_params() == model.get_params()
    with np.load(path, allow_pickle=False) as z:
        assert list(z["track_ids"]) == ["a", "b"]


def test_load_rejects_nan(tmp_path) -> None:
    model = ImplicitALS(factors=4, iterations=1, random_state=0).fit(_tiny())
    model.item_factors_[0, 0] = np.nan
    np.savez(
        tmp_path / "bad.npz",
        user_factors=model.user_factors_,
        item_factors=model.item_factors_,
        params=np.array('{"factors": 4}'),
    )
    with pytest.raises(DivergedError):
        ImplicitALS.load(tmp_path / "bad.npz")


@pytest.mark.parametrize(
    "bad, msg",
    [
        (sp.csr_matrix(np.array([[1.0, -1.0]])), "negative"),
        (sp.csr_matrix(np.array([[1.0, np.nan]])), "NaN"),
        (sp.csr_matrix(np.array([[1.0, np.inf]])), "NaN or infinite"),
        (np.ones((2, 2)), "scipy.sparse"),
        (sp.csr_matrix((3, 4)), "empty"),
    ],
)
def test_fit_rejects_bad_input(bad, msg: str) -> None:
    with pytest.raises(InvalidPlaysError, match=msg):
        ImplicitALS(factors=2, iterations=1).fit(bad)


def test_warm_started_fold_in_tracks_one_new_play() -> None:
    """A user's current vector plus one new play: warm CG lands on the exact solve; cold rows stay exact."""
    data = SyntheticMusic(n_users=300, n_tracks=120, mean_plays=15, n_genres=6, seed=4)
    m = data.matrix()
    model = ImplicitALS(factors=16, iterations=6, random_state=0).fit(m)
    rows = m[:50].tolil()
    for u in range(50):
        rows[u, (u * 7) % 120] += 1.0  # one more play each
    rows = rows.tocsr()
    exact = model.fold_in_users(rows)
    start = model.fold_in_users(m[:50])
    start[10:20] = 0.0  # no vector yet: these must be solved exactly
    warm = model.fold_in(rows, model.item_factors_, start=start)
    np.testing.assert_allclose(warm[10:20], exact[10:20], rtol=1e-3, atol=1e-4)
    err_warm = np.linalg.norm(warm - exact, axis=1) / np.linalg.norm(exact, axis=1)
    err_start = np.linalg.norm(start - exact, axis=1) / np.linalg.norm(exact, axis=1)
    moved = np.r_[0:10, 20:50]
    assert np.median(err_warm[moved]) < 0.2 * np.median(err_start[moved])
    assert err_warm[moved].max() < 0.05
    with pytest.raises(ValueError, match="start has shape"):
        model.fold_in(rows, model.item_factors_, start=start[:3])


def test_fold_in_bad_input() -> None:
    with pytest.raises(NotFittedError):
        ImplicitALS().fold_in_users(sp.csr_matrix((1, 20)))
    model = ImplicitALS(factors=4, iterations=1, random_state=0).fit(_tiny())
    with pytest.raises(InvalidPlaysError, match="columns"):
        model.fold_in_users(sp.csr_matrix((1, 19)))
    with pytest.raises(InvalidPlaysError, match="negative"):
        model.fold_in_items(sp.csr_matrix(-np.ones((1, 30))))
    with pytest.raises(ValueError):
        ImplicitALS(solver="lu").fit(_tiny())


def test_beats_popularity_by_wide_margin_on_synthetic() -> None:
    data = SyntheticMusic(n_users=3000, n_tracks=1500, seed=4)
    train, test = holdout_split(data.matrix(), seed=0)
    model = ImplicitALS(random_state=0).fit(train)
    als = ranking_metrics(model.user_factors_, model.item_factors_, train, test)
    order = popular_items(train, train.shape[1])
    pop_items = np.zeros((train.shape[1], 1), dtype=np.float32)
    pop_items[order, 0] = np.linspace(1, 0, train.shape[1])
    pop = ranking_metrics(np.ones((train.shape[0], 1), dtype=np.float32), pop_items, train, test)
    assert als.precision > 1.5 * pop.precision
    assert als.ndcg > 1.5 * pop.ndcg


def test_fold_in_after_fit_recommends_like_joint_training() -> None:
    data = SyntheticMusic(n_users=3000, n_tracks=1500, seed=5)
    train, test = holdout_split(data.matrix(), seed=1)
    joint = ImplicitALS(random_state=0).fit(train)
    late = np.arange(2500, 3000)
    early = ImplicitALS(random_state=0).fit(train[:2500])
    folded = early.fold_in_users(train[late])
    p_joint = ranking_metrics(joint.user_factors_[late], joint.item_factors_, train[late], test[late])
    p_fold = ranking_metrics(folded, early.item_factors_, train[late], test[late])
    assert p_fold.precision >= 0.9 * p_joint.precision


def test_warm_fold_in_loads_every_kernel_a_fold_in_may_call() -> None:
    """In a fresh interpreter (this one has run the kernels already): a loaded model's kernels
    are cold until the warm-up, and all three are ready after it."""
    code = """
import subprocess
import sys

import numpy as np
from core import als_kernels
from core.als import ImplicitALS
m = ImplicitALS(factors=8)
m.item_factors_ = np.random.default_rng(0).random((50, 8), dtype=np.float32)
kernels = [als_kernels.cholesky_rows_serial, als_kernels.cholesky_half_step, als_kernels._cg_kernel(8)]
before = [len(k.signatures) for k in kernels]
m.warm_fold_in(m.item_factors_)
print(before, [len(k.signatures) for k in kernels])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, after = out.strip().split("] [")
    assert before == "[0, 0, 0"
    assert all(int(n) >= 1 for n in after.rstrip("]").split(", "))
