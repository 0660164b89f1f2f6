"""The engine, trainer and RL loop on a CUDA device: the same code and assertions as the CPU suite, run where
CUDA graphs, bf16 autocast and device placement are real. Marked ``gpu`` and skipped without CUDA; the data is
generated here, so the GPU machine needs no corpus package.

    python -m pytest -m gpu tests/gpu                       # on a GPU machine
    GLM5_TEST_DEVICE=cpu python -m pytest -m gpu tests/gpu  # the tests themselves, checked on the CPU
"""

import json
import os
import random

import pytest
import torch

from glm5 import GLM5ForCausalLM, preset
from glm5.engine import LLM, SamplingParams

DEVICE = os.environ.get("GLM5_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = DEVICE.startswith("cuda")


def text_corpus(path, n_lines=3000, seed=0):
    """Learnable English-like text: templated sentences over a small vocabulary."""
    rng = random.Random(seed)
    names, verbs, things = ["the king", "a queen", "my lord", "the fool", "his son"], \
        ["sees", "loves", "fears", "calls", "finds"], ["the crown", "a letter", "the sword", "her ring", "the sea"]
    lines = [f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)}, and {rng.choice(names)} "
             f"{rng.choice(verbs)} {rng.choice(things)}." for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n")
    return path


@torch.no_grad()
def ref_greedy(model, prompt, n):
    toks = list(prompt)
    for _ in range(n):
        toks.append(int(model(torch.tensor([toks], device=DEVICE)).logits[0, -1].argmax()))
    return toks[len(prompt):]


@pytest.fixture
def exact_fp32():
    """No TF32 in fp32 matmuls while a test compares the engine with the model token for token."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("compile_decode", [False, True])
def test_engine_greedy_equals_the_model_and_decodes_through_cuda_graphs(exact_fp32, compile_decode):
    if compile_decode and not CUDA:
        pytest.skip("compile_decode applies to CUDA graphs only")
    model = GLM5ForCausalLM(preset("glm5-nano", index_topk=8)).init_weights(3).to(DEVICE).eval()
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(1, 2048, (n,), generator=g).tolist() for n in (5, 13, 40)]
    llm = LLM(model, device=DEVICE, block_size=4, max_num_seqs=4, compile_decode=compile_decode)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == ref_greedy(model, p, 8), f"prompt of {len(p)} tokens"
    graphs = llm.engine.runner.graphs
    if CUDA:
        assert graphs is not None and graphs.graphs and not graphs.failed, "decode did not run through CUDA graphs"
    else:
        assert graphs is None  # nothing CUDA-only on the CPU path


def test_mtp_verification_runs_through_cuda_graphs(exact_fp32):
    """num_speculative_tokens: verification steps (last token + up to k drafts per sequence) replay graphs captured
    for k + 1 rows per sequence; greedy output is the model's own, and a seeded sampled request gets the eager
    engine's tokens."""
    model = GLM5ForCausalLM(preset("glm5-nano", index_topk=8)).init_weights(3).to(DEVICE).eval()
    g = torch.Generator().manual_seed(2)
    ps = [torch.randint(1, 2048, (n,), generator=g).tolist() for n in (5, 13, 40)]
    kw = dict(device=DEVICE, block_size=4, max_num_seqs=4, num_speculative_tokens=3, spec_draft_stop_gap=0.03)
    llm = LLM(model, **kw)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == ref_greedy(model, p, 10), f"prompt of {len(p)} tokens"
    assert llm.spec_metrics()["draft_tokens"] > 0
    sp = SamplingParams(temperature=0.8, seed=4, max_tokens=10, ignore_eos=True)
    eager = LLM(model, use_cuda_graph=False, **kw)
    assert [o.outputs[0].token_ids for o in llm.generate(ps, sp)] == \
        [o.outputs[0].token_ids for o in eager.generate(ps, sp)]
    graphs = llm.engine.runner.graphs
    if CUDA:
        keys = sorted(graphs.graphs)  # (kind, batch bucket, rows per sequence)
        assert not graphs.failed and ("model", 4, 4) in keys and any(k[0] == "mtp" for k in keys), keys
    else:
        assert graphs is None


def test_fp8_kv_cache_on_the_device(exact_fp32):
    """kv_cache_dtype="fp8": the quantising writes and dequantising gathers run on the device (through CUDA graphs
    on CUDA) and decode the same tokens as the eager engine; the cache holds 1.8x the tokens of a bf16 one."""
    model = GLM5ForCausalLM(preset("glm5-nano", index_topk=8)).init_weights(3).to(DEVICE).eval()
    g = torch.Generator().manual_seed(1)
    ps = [torch.randint(1, 2048, (n,), generator=g).tolist() for n in (5, 13, 40)]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    graphs = LLM(model, device=DEVICE, block_size=4, max_num_seqs=4, kv_cache_dtype="fp8")
    eager = LLM(model, device=DEVICE, block_size=4, max_num_seqs=4, kv_cache_dtype="fp8", use_cuda_graph=False)
    a, b = graphs.generate(ps, sp), eager.generate(ps, sp)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    if CUDA:
        assert graphs.engine.runner.graphs.graphs and not graphs.engine.runner.graphs.failed
    from glm5.engine.kv_cache import bytes_per_block

    cfg = preset("glm5")
    ratio = bytes_per_block(cfg, 64, 78, torch.bfloat16) / bytes_per_block(cfg, 64, 78, torch.bfloat16, "fp8")
    assert abs(ratio - 1408 / 788) < 1e-9


def test_sleep_releases_device_memory_and_wakes_to_the_same_tokens(exact_fp32):
    """LLM.sleep(1): the KV cache and the weights leave the device (the weights to pinned host memory) and come back
    bit for bit, with CUDA graphs captured again at the new addresses; sleep(2) then a weight load also gives the
    same tokens (colocated RL's cycle)."""
    model = GLM5ForCausalLM(preset("glm5-nano", index_topk=8)).init_weights(3).to(DEVICE).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    ps = [torch.randint(1, 2048, (n,), generator=g).tolist() for n in (5, 13, 40)]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(model, device=DEVICE, block_size=4, max_num_seqs=4, kv_cache_memory=256 << 20)

    def tokens():
        return [o.outputs[0].token_ids for o in llm.generate(ps, sp)]

    before = tokens()
    if CUDA:
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        owned = llm.engine.kv_cache.nbytes() + sum(p.numel() * p.element_size() for p in model.parameters())
    llm.sleep(level=1)
    if CUDA:
        assert held - torch.cuda.memory_allocated() >= 0.95 * owned
        assert torch.cuda.memory_reserved() <= held - 0.9 * owned  # handed back to the driver, not just cached
    llm.wake_up()
    assert tokens() == before
    if CUDA:
        graphs = llm.engine.runner.graphs
        assert graphs.graphs and not graphs.failed  # captured again after the wake-up
    llm.sleep(level=2)
    llm.wake_up(["weights"])
    model.load_state_dict(state)
    llm.wake_up(["kv_cache"])
    assert tokens() == before


def test_engine_serves_bf16_with_mtp_drafts():
    model = GLM5ForCausalLM(preset("glm5-nano")).init_weights(5).to(device=DEVICE)
    if CUDA:
        model = model.to(torch.bfloat16)
    llm = LLM(model.eval(), device=DEVICE, num_speculative_tokens=3)
    outs = llm.generate([[1, 2, 3, 4, 5]] * 3, SamplingParams(temperature=0.8, seed=7, max_tokens=24,
                                                              ignore_eos=True, logprobs=0))
    for o in outs:
        c = o.outputs[0]
        assert len(c.token_ids) == 24 and all(torch.isfinite(torch.tensor(list(d.values()))).all()
                                              for d in c.logprobs)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids  # same seed, same tokens
    assert llm.engine.stats["spec_verify_steps"] > 0


def test_trainer_learns_and_checkpoints_on_the_device(tmp_path):
    from glm5.tokenizer.bpe import train_bpe
    from glm5.train.config import TrainConfig
    from glm5.train.trainer import Trainer

    corpus = text_corpus(tmp_path / "corpus.txt")
    train_bpe([corpus], 2048).save_pretrained(tmp_path / "tok")
    cfg = TrainConfig(preset="glm5-nano", data=[str(corpus)], tokenizer=str(tmp_path / "tok"), device=DEVICE,
                      cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"), seq_len=64, batch_size=8,
                      max_steps=30, lr=3e-3, eval_every=15, eval_batches=4, ckpt_every=15, progress=False)
    t = Trainer(cfg)
    first = t.evaluate()["val_loss"]
    summary = t.fit()
    t.close()
    assert next(t.model.parameters()).device.type == torch.device(DEVICE).type
    assert summary["final_val"]["val_loss"] < first - 1.0
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in recs if r["kind"] == "train")  # no NaN under bf16 autocast
    assert (tmp_path / "run" / "checkpoints" / "step_00000030" / "trainer_state.json").exists()
    GLM5ForCausalLM.from_pretrained(tmp_path / "run" / "hf")


@pytest.mark.parametrize("offload", [False, True], ids=["resident", "offload"])
def test_rl_steps_with_rollout_and_training_on_the_device(tmp_path, offload):
    """Colocated RL on the device; with offload_rollout the engine sleeps (level 2) while the trainer runs and
    its next rollouts are scored as the trainer scores them (the weights came back from the push)."""
    from glm5.rl.runner import RLConfig, run_rl
    from glm5.tokenizer.bpe import train_bpe

    tok = train_bpe([text_corpus(tmp_path / "c.txt")], 420)
    cfg = preset("glm5-nano", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_ids, pad_token_id=tok.pad_token_id)
    d = tmp_path / "policy"
    GLM5ForCausalLM(cfg).init_weights(0).save_pretrained(d)
    tok.save_pretrained(d)
    s = run_rl(RLConfig(model=str(d), out=str(tmp_path / "rl"), tasks=["arith"], n_train=32, n_eval=8,
                        group_size=4, manager={"mode": "sync", "num_steps": 2, "groups_per_step": 2,
                                               "offload_rollout": offload},
                        rollout={"max_new_tokens": 12}, trainer={"lr": 1e-3}, placement="colocate",
                        device=DEVICE, rollout_device=DEVICE, max_model_len=256, save=False, progress=False))
    assert s["run"]["steps"] == 2 and s["run"]["final_version"] == 2
    recs = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["logprob_gap_mean"] < 1e-3  # the engine on the device scores what the trainer scores
    if offload:
        assert recs[-1]["logprob_gap_mean"] < 1e-3 and recs[-1]["rollout_offload_s"] > 0
