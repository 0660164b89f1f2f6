import pytest


@pytest.fixture(autouse=True)
def _one_thread_here(one_thread):
    """Small tensors: one intra-op thread (see tests/conftest.py)."""
    yield
