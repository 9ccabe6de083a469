"""The embedded synthetic dataset: deterministic, masks that match their images."""
import hashlib

import numpy as np
import pytest
from PIL import Image

from ncl_fast.data import synthetic as synth
from ncl_fast.data import load_entries

pytestmark = pytest.mark.slow


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.png")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    a = synth.generate(tmp_path / "a", n=6, seed=3, progress=False)
    b = synth.generate(tmp_path / "b", n=6, seed=3, progress=False)
    c = synth.generate(tmp_path / "c", n=6, seed=4, progress=False)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_masks_agree_with_images(tmp_path):
    root = synth.generate(tmp_path / "s", n=20, seed=0, progress=False)
    entries, report = load_entries(str(root))  # sizes match, files readable
    assert not report.errors and not report.warnings
    kinds = set()
    for e in entries:
        kind = e.image.rsplit("_", 1)[1][:-4]
        kinds.add(kind)
        mask = np.asarray(Image.open(e.mask))
        assert set(np.unique(mask)) <= {0, 255}
        frac = (mask > 127).mean()
        if kind == "authentic":
            assert frac == 0
        else:
            assert 0.01 < frac < 0.4, (e.image, frac)
            # the region is not a rectangle: its bounding box holds authentic pixels too
            ys, xs = np.nonzero(mask)
            box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            assert (box == 0).mean() > 0.05
    assert kinds == {"splice", "copymove", "removal", "authentic"}
    photos = synth.load_photos()
    # one sample is a pure function of (seed, index)
    first, second = synth.make_sample(photos, 0, 7), synth.make_sample(photos, 0, 7)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
