"""Per-image seeds (epg.sampling.per_image) are numpy's SeedSequence([seed, index]) words, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from epg.sampling.per_image import class_labels, image_noise, image_seeds

# Values of np.random.SeedSequence([seed, index]).generate_state(3) as written before image_seeds moved onto
# epg.io.seed_words: a changed hash would silently change every sample folder and FID of a resumed run.
PINNED = {
    (0, 0): (2968811710, 3677149159, 745650761),
    (1234, 7): (2137525305, 3060476886, 1882930438),
    (2**40 + 3, 49999): (1880165294, 159178994, 483852045),
}


@pytest.mark.parametrize("key", sorted(PINNED))
def test_image_seeds_are_the_pinned_seedsequence_words(key):
    assert image_seeds(*key) == PINNED[key]
    assert image_seeds(*key) == tuple(int(w) for w in np.random.SeedSequence(list(key)).generate_state(3))
    assert all(type(s) is int for s in image_seeds(*key))


def test_noise_and_labels_follow_the_seeds():
    noise = image_noise(1234, [0, 5], (2,))
    assert noise.flatten().tolist() == pytest.approx(
        [0.9414975643157959, -1.4410810470581055, 1.3677200078964233, -0.41523513197898865]
    )
    assert class_labels([0, 1, 2, 3], 8, 10, "random", 1234).tolist() == [3, 3, 2, 7]


def test_negative_seed_or_index_is_refused():
    with pytest.raises(ValueError, match="non-negative"):
        image_seeds(-1, 0)
