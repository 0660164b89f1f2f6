"""The checkpoint's RNG file holds tensors, tuples and numbers only: it loads with ``weights_only=True`` (no
unpickling of arbitrary objects) and restores every generator exactly."""

import random

import numpy as np
import torch

from glm5.train.checkpoint import _rng_state, _set_rng_state


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    np.random.seed(3)
    random.seed(4)
    torch.manual_seed(5)
    np.random.normal()  # a cached Gaussian is part of numpy's state
    torch.save(_rng_state(), tmp_path / "rank0.pt")
    expected = (np.random.rand(4), np.random.normal(), random.random(), torch.rand(3))
    _set_rng_state(torch.load(tmp_path / "rank0.pt", weights_only=True))
    got = (np.random.rand(4), np.random.normal(), random.random(), torch.rand(3))
    assert np.array_equal(expected[0], got[0]) and expected[1] == got[1] and expected[2] == got[2]
    assert torch.equal(expected[3], got[3])
