"""The dashboard's per-minute freshness histogram: each age lands in the bin its edges name."""

from __future__ import annotations

import numpy as np
import pytest

from services.infra.series import EDGES, SeriesRecorder

pytestmark = pytest.mark.unit


def test_ages_are_binned_by_the_edges_they_do_not_exceed() -> None:
    rec = SeriesRecorder.__new__(SeriesRecorder)  # no Redis: only the in-memory buffer
    rec._pending = {}
    ages = np.array([-0.5, 0.0, 0.01, 0.011, 0.2, 60.0, 61.0, 3600.0])
    rec.observe(125.0, ages, dead_letters=2)
    rec.observe(130.0, iter([0.03]))  # any iterable of ages
    got = rec._pending[2]
    # bin i holds ages in (EDGES[i-1], EDGES[i]]; the last bin everything above 60 s
    assert got["f0"] == 3 and got["f1"] == 1 and got["f2"] == 1
    assert got[f"f{EDGES.index(0.25)}"] == 1
    assert got[f"f{len(EDGES) - 1}"] == 1 and got[f"f{len(EDGES)}"] == 2
    assert got["plays"] == 9 and got["dead_letters"] == 2
