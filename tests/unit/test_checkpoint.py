"""PlayMatrix: offsets fencing, time decay and the checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import CheckpointMismatchError
from services.batch.checkpoint import MAX_HALF_LIVES, PlayMatrix

pytestmark = pytest.mark.unit
DAY = 86_400.0


def test_replayed_offsets_are_not_counted_twice(tmp_path) -> None:
    pm = PlayMatrix()
    assert pm.add("inc", 0, 0, "u1", "t1", 2.0)
    assert not pm.add("inc", 0, 0, "u1", "t1", 2.0)
    assert pm.add("inc", 1, 0, "u1", "t1", 1.0)
    pm.save(tmp_path / "c.npz", 1.0)
    back = PlayMatrix.load(tmp_path / "c.npz")
    assert back.matrix()[0, 0] == 3.0
    assert not back.add("inc", 1, 0, "u1", "t1", 1.0)
    assert back.add("other-incarnation", 1, 0, "u1", "t1", 1.0)


def test_decay_halves_a_play_per_half_life(tmp_path) -> None:
    pm = PlayMatrix(half_life_s=30 * DAY)
    t0 = 1_700_000_000.0
    pm.add("inc", 0, 0, "u1", "old", 4.0, t0)
    pm.add("inc", 0, 1, "u1", "new", 4.0, t0 + 60 * DAY)
    pm.add("inc", 0, 2, "u2", "old", 1.0, t0 + 30 * DAY)
    m = pm.training_matrix(t0 + 60 * DAY).toarray()
    np.testing.assert_allclose(m, [[1.0, 4.0], [0.5, 0.0]], rtol=1e-5)  # columns: old, new
    np.testing.assert_allclose(pm.training_matrix(t0 + 90 * DAY).toarray(), m / 2, rtol=1e-5)
    pm.save(tmp_path / "c.npz", t0)
    back = PlayMatrix.load(tmp_path / "c.npz")
    np.testing.assert_allclose(back.training_matrix(t0 + 60 * DAY).toarray(), m, rtol=1e-5)
    assert PlayMatrix().training_matrix(t0).shape == (0, 0)  # no decay, no plays


def test_reanchoring_keeps_weights_finite_and_equal() -> None:
    hl = 1.0
    pm = PlayMatrix(half_life_s=hl)
    pm.add("inc", 0, 0, "u", "a", 1.0, 0.0)
    pm.add("inc", 0, 1, "u", "b", 1.0, 10.0)
    far = (MAX_HALF_LIVES + 5) * hl
    pm.add("inc", 0, 2, "u", "c", 1.0, far)  # would overflow the exponent without re-anchoring
    assert pm.anchor == far
    m = pm.training_matrix(far).toarray()[0]
    assert np.all(np.isfinite(pm.matrix().data))
    np.testing.assert_allclose(m, [2.0**-far, 2.0 ** (10 - far), 1.0], rtol=1e-4)


def test_a_checkpoint_with_another_half_life_is_refused(tmp_path) -> None:
    pm = PlayMatrix(half_life_s=DAY)
    pm.add("inc", 0, 0, "u", "t", 1.0, 5.0)
    pm.save(tmp_path / "c.npz", 1.0)
    back = PlayMatrix.load(tmp_path / "c.npz")
    back.check_half_life(DAY)
    with pytest.raises(CheckpointMismatchError, match="half-life"):
        back.check_half_life(0.0)
    PlayMatrix().check_half_life(0.0)  # an empty matrix adopts any setting


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "swap_array"])
def test_a_damaged_checkpoint_is_refused_with_the_remedy(tmp_path, damage: str) -> None:
    import zipfile

    from core.errors import CorruptFileError

    pm = PlayMatrix()
    for i in range(200):
        pm.add("inc", 0, i, f"u{i % 13}", f"t{i % 7}", 1.0 + i)
    path = tmp_path / "checkpoint.npz"
    pm.save(path, 1.0)
    assert PlayMatrix.load(path).matrix().sum() == pytest.approx(pm.matrix().sum())
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip_byte":
        # change one stored weight inside the uncompressed data array, keeping the zip valid
        with zipfile.ZipFile(path) as z:
            members = {n: z.read(n) for n in z.namelist()}
        data = bytearray(members["data.npy"])
        data[-1] ^= 0x40
        members["data.npy"] = bytes(data)
        with zipfile.ZipFile(path, "w") as z:
            for n, b in members.items():
                z.writestr(n, b)
    else:
        other = PlayMatrix()
        other.add("inc", 0, 0, "x", "y", 5.0)
        other.save(tmp_path / "other.npz", 1.0)
        with zipfile.ZipFile(path) as z, zipfile.ZipFile(tmp_path / "other.npz") as o:
            members = {n: z.read(n) for n in z.namelist()}
            members["data.npy"] = o.read("data.npy")
        with zipfile.ZipFile(path, "w") as z:
            for n, b in members.items():
                z.writestr(n, b)
    with pytest.raises(CorruptFileError, match="encore train --rebuild"):
        PlayMatrix.load(path)


def test_an_erase_record_removes_the_users_row_and_later_plays_start_a_new_one(tmp_path) -> None:
    pm = PlayMatrix()
    pm.add("i", 0, 0, "a", "t1", 2.0)
    pm.add("i", 0, 1, "b", "t1", 1.0)
    pm.add("i", 0, 2, "a", "t2", 1.0)
    pm.add("i", 1, 0, "c", "t3", 1.0)
    assert pm.erase("i", 0, 3, "a") and not pm.erase("i", 0, 3, "a")  # replayed: a no-op
    assert pm.erase("i", 1, 1, "c")
    m = pm.matrix()
    assert pm.user_ids == ["b"] and m.shape[0] == 1 and m[0, pm.track_ids.index("t1")] == 1.0
    pm.add("i", 0, 4, "a", "t3", 5.0)  # after the erasure
    pm.save(tmp_path / "c.npz", 1.0)
    back = PlayMatrix.load(tmp_path / "c.npz")
    m = back.matrix()
    rows = {
        u: {back.track_ids[j]: float(v) for j, v in zip(r.indices, r.data, strict=True)}
        for u, r in zip(back.user_ids, m, strict=True)
    }
    assert rows == {"b": {"t1": 1.0}, "a": {"t3": 5.0}}
    # A play of an erased user in the same stretch before compaction: the old row still goes.
    pm.add("i", 0, 5, "b", "t2", 1.0)
    pm.erase("i", 0, 6, "b")
    pm.add("i", 0, 7, "b", "t9", 1.0)
    m = pm.matrix()
    rows = {u: {pm.track_ids[j] for j in r.indices} for u, r in zip(pm.user_ids, m, strict=True)}
    assert rows["b"] == {"t9"}
