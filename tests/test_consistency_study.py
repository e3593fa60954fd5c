"""scripts/consistency_study.py: one person, two photos (3 validation photos and their changed copies)."""

import numpy as np
import pytest

from _scripts import load_script

def _script():
    return load_script("consistency_study")


@pytest.mark.real_faces
def test_changed_copies_are_compared_with_their_photo_and_strangers_with_each_other():
    from likeness.backend import realfaces
    if not (realfaces.default_root() / "images").is_dir():
        pytest.skip("the shared real faces are not here")
    cs = _script()
    mirrored = cs.changed(np.arange(12, dtype=np.uint8).reshape(2, 2, 3), "mirror")
    assert mirrored[0, 0].tolist() == [3, 4, 5]
    r = cs.study("val", limit=3, log=lambda s: None)
    assert r["photos"] + len(r["skipped"]) == 3 and r["photos"] >= 2
    assert set(r["agreement"]) == {"strangers", *cs.CHANGES}
    for row in r["agreement"].values():
        assert set(row) == set(cs.SLOTS) and all(0.0 <= v <= 1.0 for v in row.values())
    # strangers: each of the n (n - 1) ordered pairs counts, so with n photos the share is k / (n (n - 1))
    n = r["photos"]
    assert all(abs(v * n * (n - 1) - round(v * n * (n - 1))) < 1e-2 for v in r["agreement"]["strangers"].values())
    table = cs.markdown(r)
    assert table.count("\n") == 2 + 1 + len(cs.CHANGES) and "| mirror |" in table
