"""The sampled holdout, warm-started refits, beyond-accuracy measures and the search."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from core.als import ImplicitALS
from core.errors import ConfigError
from core.evaluation import ranking_metrics, sample_holdout
from core.list_metrics import _column_diversity, beyond_accuracy
from core.synthetic import SyntheticMusic
from core.tuning import Space, tune
from services.infra.settings import Settings


def test_sample_holdout_costs_only_the_sampled_users_plays() -> None:
    m = SyntheticMusic(n_users=600, n_tracks=300, seed=3).matrix()
    train, test = sample_holdout(m, users=50, fraction=0.2, seed=1)
    assert (train + test - m).nnz == 0 and train.multiply(test).nnz == 0  # a partition of the plays
    losers = np.flatnonzero(np.diff(test.indptr))
    assert losers.size == 50  # exactly the sample, each losing at least one track
    kept = np.diff(train.indptr)
    per_user = np.diff(sp.csr_matrix(m).indptr)
    others = np.setdiff1d(np.arange(m.shape[0]), losers)
    assert np.array_equal(kept[others], per_user[others])  # everyone else trains on all plays
    share = np.diff(test.indptr)[losers] / per_user[losers]
    assert 0.1 < share.mean() < 0.3
    assert (per_user[losers] >= 3).all()


def test_warm_start_continues_from_the_given_factors_without_changing_them() -> None:
    m = SyntheticMusic(n_users=500, n_tracks=200, seed=4).matrix()
    first = ImplicitALS(factors=8, iterations=6, random_state=0).fit(m)
    start = (first.user_factors_.copy(), first.item_factors_.copy())
    zero = ImplicitALS(factors=8, iterations=0).fit(m, init=start)
    assert np.array_equal(zero.item_factors_, start[1])  # no iteration: the given factors exactly
    more = ImplicitALS(factors=8, iterations=2).fit(m, init=(first.user_factors_, first.item_factors_))
    assert np.array_equal(first.item_factors_, start[1])  # the caller's arrays are left alone
    consumed = (first.user_factors_.copy(), first.item_factors_.copy())
    reused = ImplicitALS(factors=8, iterations=2).fit(m, init=consumed, consume_init=True)
    assert reused.item_factors_ is consumed[1]  # updated in place: a refit keeps one copy
    np.testing.assert_allclose(reused.item_factors_, more.item_factors_, rtol=1e-5, atol=1e-6)
    assert more.loss(m) <= first.loss(m) * (1 + 1e-4)  # ALS steps from there do not undo the fit
    with pytest.raises(ValueError, match="init shapes"):
        ImplicitALS(factors=4, iterations=1).fit(m, init=start)


def test_beyond_accuracy_on_lists_worked_by_hand() -> None:
    # 4 users × 4 tracks; listeners per track: 4, 2, 1, 1 → shares 1, .5, .25, .25.
    plays = sp.csr_matrix(np.array([[1, 1, 1, 0], [1, 1, 0, 1], [1, 0, 0, 0], [1, 0, 0, 0]], dtype=np.float32))
    truth = sp.csr_matrix(np.array([[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32))
    top = np.array([[0, 1], [0, 3], [2, -1]])
    out = beyond_accuracy(top, plays, truth, artist_of={0: "a", 1: "a", 3: "b"})
    assert out["coverage@2"] == pytest.approx(1.0)  # tracks 0, 1, 2, 3 all listed
    bits = [0, 1, 0, 2, 2]  # −log2 share of 0, 1, 0, 3, 2
    assert out["novelty@2"] == pytest.approx(np.mean(bits))
    assert out["popularity_lift@2"] == pytest.approx(np.mean([1, 0.5, 1, 0.25, 0.25]) / 0.25)
    cos01 = 2 / (2 * np.sqrt(2))  # columns 0 and 1 share users 0 and 1
    cos03 = 1 / (2 * 1)
    assert out["diversity@2"] == pytest.approx(np.mean([1 - cos01, 1 - cos03]))  # the 1-track list is skipped
    assert out["artist_diversity@2"] == pytest.approx(np.mean([0.5, 1.0]))


def test_diversity_on_a_user_sample_estimates_the_full_measure() -> None:
    """Past DIVERSITY_ROWS users the column cosines come from a sample of users: close to the
    measure over everyone, and equal to it when the sample would be everyone."""
    m = SyntheticMusic(n_users=6000, n_tracks=300, seed=6).matrix()
    top = np.random.default_rng(0).integers(0, 300, (400, 10))
    top[:5, 5:] = -1
    full = _column_diversity(top, m, max_rows=m.shape[0])
    assert _column_diversity(top, m, max_rows=10 * m.shape[0]) == full
    sampled = _column_diversity(top, m, max_rows=2000)
    assert sampled != full and abs(sampled - full) < 0.02


def test_evaluation_keeps_its_top_lists() -> None:
    m = SyntheticMusic(n_users=400, n_tracks=200, seed=5).matrix()
    train, test = sample_holdout(m, users=100, seed=0)
    model = ImplicitALS(factors=8, iterations=4, random_state=0).fit(train)
    found = ranking_metrics(model.user_factors_, model.item_factors_, train, test, k=10, max_users=None)
    assert found.top.shape == (found.users, 10) and found.top_users.size == found.users
    for row, u in zip(found.top[:20], found.top_users[:20], strict=True):
        assert not set(row) & set(train[u].indices)  # played tracks are never listed


def test_search_beats_a_poor_start_and_records_every_trial() -> None:
    m = SyntheticMusic(n_users=800, n_tracks=300, mean_plays=25, seed=6).matrix()
    train, test = sample_holdout(m, users=300, seed=0)

    def fit(p: dict[str, object]) -> ImplicitALS:
        return ImplicitALS(iterations=6, random_state=0, **p).fit(train)  # type: ignore[arg-type]

    def score(model: ImplicitALS) -> float:
        return ranking_metrics(model.user_factors_, model.item_factors_, train, test, max_users=None).precision

    poor = {"factors": 8, "regularization": 10.0, "alpha": 0.1, "confidence": "linear"}
    space = Space(factors=(8, 16, 32))
    result = tune(fit, score, [poor], budget_s=600, max_trials=12, space=space)
    assert len(result.trials) == 12
    assert result.trials[0]["params"] == space.clip(poor)  # the known point is tried first
    assert result.best_score == max(t["score"] for t in result.trials)
    assert result.best_score > result.trials[0]["score"] * 1.2
    assert result.model is not None and score(result.model) == pytest.approx(result.best_score)
    record = result.record()
    assert record["winner"] == result.best_params and len(record["trials"]) == 12


def test_search_stops_at_its_budget_and_survives_failed_trials() -> None:
    calls = []

    def fit(p: dict[str, object]) -> ImplicitALS:
        calls.append(p)
        raise ArithmeticError("diverged")

    result = tune(fit, lambda _m: 0.0, [{"factors": 64}], budget_s=0.0, max_trials=50)
    assert len(calls) == 1 and result.model is None  # the budget ends the search after one trial
    assert result.trials[0]["score"] is None and "diverged" in result.trials[0]["error"]


def test_space_clip_moves_a_point_inside() -> None:
    space = Space(factors=(32, 64), alpha=(1.0, 10.0))
    assert space.clip({"factors": 50, "alpha": 500.0, "confidence": "cubic", "epsilon": 5.0}) == {
        "factors": 64,
        "alpha": 10.0,
        "confidence": "log",
        "epsilon": 5.0,
    }
    assert "epsilon" not in space.clip({"factors": 32, "confidence": "linear", "epsilon": 1.0})


def test_tuning_settings_parse_and_refuse_bad_values() -> None:
    assert Settings.from_env({"ENCORE_TUNE": "false"}).tune is False
    assert Settings.from_env({"ENCORE_TUNE": "ON"}).tune is True
    with pytest.raises(ConfigError, match="expected true or false"):
        Settings.from_env({"ENCORE_TUNE": "maybe"})
    with pytest.raises(ConfigError, match="comma-separated integers"):
        Settings.from_env({"ENCORE_TUNE_FACTORS": "32,lots"})
    with pytest.raises(ConfigError, match="between 1 and 1024"):
        Settings.from_env({"ENCORE_TUNE_FACTORS": "0,64"})
