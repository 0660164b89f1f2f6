"""Shared fixtures for the RL tests: a tiny trained BPE tokenizer and a glm5-nano-sized policy saved as a checkpoint
directory (config + safetensors + tokenizer), so the real engine, trainer and CLI load it like any checkpoint."""

import random

import pytest
import torch

from glm5.config import preset
from glm5.model.transformer import GLM5ForCausalLM
from glm5.rl.tasks import make_task_set
from glm5.tokenizer import train_bpe


def _corpus():
    rng = random.Random(0)
    tasks = make_task_set(["arith"], 200, seed=1, unanswerable_frac=0.3)
    docs = []
    for t in tasks:
        ans = t["answer"] if t["answerable"] else "I don't know."
        docs.append(f"{t['question']} Let me think. {rng.randint(0, 99)} plus {rng.randint(0, 9)}.</think>{ans}")
    docs += ["calculator expression python code print tool_call arguments result answer"] * 5
    return docs


@pytest.fixture(scope="session")
def tok():
    return train_bpe(_corpus(), vocab_size=420)


def nano_config(tok, **over):
    return preset("glm5-nano", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_ids,
                  pad_token_id=tok.pad_token_id, **over)


@pytest.fixture(scope="session")
def make_config(tok):
    """glm5-nano sized config matching the test tokenizer (importlib mode: tests cannot import conftest)."""
    return lambda **over: nano_config(tok, **over)


@pytest.fixture(scope="session")
def model_dir(tok, tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("rl_policy")
    GLM5ForCausalLM(nano_config(tok)).init_weights(0).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def policy(model_dir):
    return GLM5ForCausalLM.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def tasks():
    return make_task_set(["arith"], 48, seed=0, unanswerable_frac=0.25)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny, and with the cores oversubscribed (other suites, the rollout
    process) OpenMP spin-waiting makes 2 threads 10-20x slower than 1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
