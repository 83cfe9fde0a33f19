"""Seeds hashed from integer keys, e.g. (seed, step, stream, rank): independent draws that a resumed run recreates."""

from __future__ import annotations

import numpy as np


def seed_from(*key: int) -> int:
    """A 63-bit seed from the integers ``key`` (numpy's SeedSequence hash; negative keys wrap modulo 2^64)."""
    entropy = [int(k) % (1 << 64) for k in key]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1
