import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing when tests run alongside subprocesses.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
