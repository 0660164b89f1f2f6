"""Tensor parallelism: the split of the weights (one process), and torchrun with 2 CPU ranks over gloo generating
exactly what one process generates (plain, DSA-sparse, sampled, MTP-speculative, expert-parallel, FP8 weights kept as
float8), plus the CLI and the errors."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from glm5.checkpoint.hf import load_pretrained
from glm5.config import preset
from glm5.engine import LLM
from glm5.model.mla import MLAttention
from glm5.model.moe import Experts
from glm5.model.tensor_parallel import TensorParallel, apply_tensor_parallel, shard_dim
from glm5.model.transformer import GLM5ForCausalLM

CFG = preset("glm5-nano", num_nextn_predict_layers=1)  # 4 heads, index_topk 16: prompts below go sparse


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp") / "nano"
    GLM5ForCausalLM(CFG).init_weights(0).save_pretrained(path, max_shard_size="1MB")  # several shards
    return path


def _reassemble(name, parts, ep=False):
    dim = shard_dim(name, ep)
    if dim is None:
        for p in parts[1:]:
            assert torch.equal(p, parts[0]), f"{name} should be replicated"
        return parts[0]
    if name.endswith(("gate_up_proj", "gate_up_proj_scale_inv")) and not ep:  # [its gate rows; its up rows]
        halves = [p.chunk(2, dim=1) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves], 1), torch.cat([h[1] for h in halves], 1)], 1)
    return torch.cat(parts, dim)


@pytest.mark.parametrize("ep", [False, True], ids=["tp", "ep"])
def test_each_rank_loads_its_slice_and_the_slices_reassemble(ckpt, ep):
    full = load_pretrained(ckpt).state_dict()
    ranks = [load_pretrained(ckpt, tensor_parallel=TensorParallel(r, 2, expert_parallel=ep)) for r in range(2)]
    sds = [m.state_dict() for m in ranks]
    assert set(sds[0]) == set(full)
    split = 0
    for name, t in full.items():
        if shard_dim(name, ep) is not None:
            split += 1
            assert sds[0][name].numel() * 2 == t.numel(), name
        assert torch.equal(_reassemble(name, [sd[name] for sd in sds], ep), t), name
    assert split >= 4 * (CFG.num_hidden_layers + 1)  # attention and feed-forward of every layer and the MTP block
    attn = [m for m in ranks[0].modules() if isinstance(m, MLAttention)]
    assert attn and all(m.n_heads == CFG.num_attention_heads // 2 for m in attn)
    experts = [m for m in ranks[1].modules() if isinstance(m, Experts)]
    E, I = CFG.n_routed_experts, CFG.moe_intermediate_size
    if ep:  # rank 1 holds experts E/2 .. E-1 whole
        assert all((m.n_experts, m.expert_offset, m.intermediate) == (E // 2, E // 2, I) for m in experts)
    else:
        assert all((m.n_experts, m.expert_offset, m.intermediate) == (E, None, I // 2) for m in experts)
    # sharding a model in memory gives the same tensors as loading the slices
    mem = apply_tensor_parallel(load_pretrained(ckpt), TensorParallel(1, 2, expert_parallel=ep),
                                collectives=False).state_dict()
    assert all(torch.equal(mem[n], sds[1][n]) for n in full)


@pytest.mark.parametrize("ep", [False, True], ids=["tp", "ep"])
def test_feed_forward_and_head_partials_add_up(ckpt, ep):
    """Without collectives each rank's MLP / MoE returns a partial sum and lm_head a vocabulary slice."""
    full = load_pretrained(ckpt)
    ranks = [apply_tensor_parallel(load_pretrained(ckpt), TensorParallel(r, 2, expert_parallel=ep), collectives=False)
             for r in range(2)]
    x = torch.randn(7, CFG.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in (0, CFG.num_hidden_layers - 1):  # the dense layer and an MoE layer (routed + shared expert)
            ref = full.model.layers[i].mlp(x)
            got = sum(m.model.layers[i].mlp(x) for m in ranks)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([m.lm_head(x) for m in ranks], -1), full.lm_head(x))


def test_bad_placements_are_clear_errors(ckpt, monkeypatch):
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        apply_tensor_parallel(GLM5ForCausalLM(CFG), TensorParallel(0, 3))
    with pytest.raises(ValueError, match="n_routed_experts=8"):
        apply_tensor_parallel(GLM5ForCausalLM(CFG.replace(num_attention_heads=6)), TensorParallel(0, 3, None, True))
    with pytest.raises(ValueError, match="not a valid placement"):
        TensorParallel(2, 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        LLM(str(ckpt), tensor_parallel_size=2)
    m = apply_tensor_parallel(GLM5ForCausalLM(CFG).init_weights(0), TensorParallel(0, 2), collectives=False)
    with pytest.raises(ValueError, match="split over 2 rank"):
        LLM(m)  # a sharded model needs its tensor_parallel_size
    with pytest.raises(ValueError, match="already tensor-parallel"):
        apply_tensor_parallel(m, TensorParallel(0, 2))


# FP8 weights kept as float8 split with their 128×128 scale blocks: a config whose per-rank widths are multiples of 128
FP8_CFG = preset("glm5-nano", num_attention_heads=4, num_key_value_heads=4, qk_nope_head_dim=96, qk_rope_head_dim=32,
                 v_head_dim=128, head_dim=32, index_head_dim=64, intermediate_size=256, moe_intermediate_size=256,
                 num_nextn_predict_layers=1)


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    from glm5.checkpoint.quantize import quantize_checkpoint

    root = tmp_path_factory.mktemp("tp_fp8")
    GLM5ForCausalLM(FP8_CFG).init_weights(0).save_pretrained(root / "bf16")
    quantize_checkpoint(root / "bf16", root / "fp8")
    return root / "fp8"


@pytest.mark.parametrize("ep", [False, True], ids=["tp", "ep"])
def test_fp8_weights_split_with_their_scale_blocks(fp8_ckpt, ep):
    from glm5.model.fp8_linear import FP8Experts, FP8Linear

    full_model = load_pretrained(fp8_ckpt, fp8="keep")
    full = full_model.state_dict()
    ranks = [load_pretrained(fp8_ckpt, fp8="keep", tensor_parallel=TensorParallel(r, 2, expert_parallel=ep))
             for r in range(2)]
    fp8 = [n for n, t in full.items() if t.dtype == torch.float8_e4m3fn]
    assert any("experts" in n for n in fp8) and any("q_b_proj" in n for n in fp8)  # both kinds stay FP8
    assert sum(isinstance(m, (FP8Linear, FP8Experts)) for m in ranks[0].modules()) == \
        sum(isinstance(m, (FP8Linear, FP8Experts)) for m in full_model.modules())
    for name, t in full.items():
        got = _reassemble(name, [m.state_dict()[name] for m in ranks], ep)
        assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else got,
                                                    t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t), name
    # each rank's FP8 modules compute their partial sums from the stored blocks
    x = torch.randn(5, FP8_CFG.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        parts = [apply_tensor_parallel(load_pretrained(fp8_ckpt, fp8="keep"), TensorParallel(r, 2, expert_parallel=ep),
                                       collectives=False) for r in range(2)]
        i = FP8_CFG.num_hidden_layers - 1
        torch.testing.assert_close(sum(m.model.layers[i].mlp(x) for m in parts), full_model.model.layers[i].mlp(x),
                                   rtol=1e-5, atol=1e-5)


def test_fp8_blocks_that_would_straddle_ranks_are_refused(tmp_path):
    from glm5.checkpoint.quantize import quantize_checkpoint

    GLM5ForCausalLM(CFG).init_weights(0).save_pretrained(tmp_path / "bf16")  # 32-wide heads: blocks of 128 straddle
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "fp8")
    with pytest.raises(ValueError, match="would split its FP8 scale blocks"):
        load_pretrained(tmp_path / "fp8", fp8="keep", tensor_parallel=TensorParallel(0, 2))
    load_pretrained(tmp_path / "fp8", tensor_parallel=TensorParallel(0, 2))  # dequantised: any split works


# One script, run by every rank (SPMD), and by the test process itself as the single-device reference.
_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from glm5.engine import LLM, SamplingParams

    def run(model_dir, tp, spec, ep=False, fp8="dequantize", kv_cache_dtype="auto"):
        llm = LLM(model_dir, tensor_parallel_size=tp, max_model_len=256, num_speculative_tokens=spec,
                  enable_expert_parallel=ep and tp > 1, fp8=fp8, kv_cache_dtype=kv_cache_dtype)
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(1, 2000, (n,), generator=g).tolist() for n in (5, 30, 70)]
        params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2),
                  SamplingParams(temperature=0.8, seed=7, max_tokens=20, ignore_eos=True),
                  SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, n=2)]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return {"tokens": [[c.token_ids for c in o.outputs] for o in outs],
                "logprobs": [{str(k): v for k, v in step.items()} for step in outs[0].outputs[0].logprobs],
                "acceptance": llm.spec_metrics()["acceptance_length"] if spec else None}

    if __name__ == "__main__":
        model_dir, fp8_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
        tp = int(os.environ.get("WORLD_SIZE", "1"))
        res = {"plain": run(model_dir, tp, 0), "mtp": run(model_dir, tp, 2), "ep": run(model_dir, tp, 0, ep=True),
               "fp8": run(fp8_dir, tp, 0, fp8="keep"), "fp8_ep": run(fp8_dir, tp, 0, ep=True, fp8="keep"),
               "kv_fp8": run(model_dir, tp, 0, kv_cache_dtype="fp8")}
        with open(f"{out}.{os.environ.get('RANK', '0')}.json", "w") as f:
            json.dump(res, f)
""")


def test_two_ranks_generate_what_one_process_generates(ckpt, fp8_ckpt, tmp_path):
    script = tmp_path / "tp_generate.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(ckpt), str(fp8_ckpt), str(tmp_path / "tp")]
    r = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    subprocess.run([sys.executable, str(script), str(ckpt), str(fp8_ckpt), str(tmp_path / "one")], env=env, timeout=300,
                   check=True)
    one, rank0, rank1 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one.0", "tp.0", "tp.1"))
    assert rank0 == rank1  # every rank took the same decisions
    for mode in ("plain", "mtp", "ep", "fp8", "fp8_ep", "kv_fp8"):
        assert rank0[mode]["tokens"] == one[mode]["tokens"], mode  # greedy, seeded and engine-seeded sampling
        for a, b in zip(rank0[mode]["logprobs"], one[mode]["logprobs"]):
            assert a.keys() == b.keys()
            assert all(abs(a[k] - b[k]) < 1e-4 for k in a)
    assert rank0["mtp"]["tokens"][0] == one["plain"]["tokens"][0]  # speculation leaves greedy output unchanged
    assert rank0["mtp"]["acceptance"] == one["mtp"]["acceptance"]


@pytest.mark.slow  # ~20 s of torchrun start-up; the engine under two ranks is covered by the test above
def test_generate_cli_under_torchrun_prints_once(ckpt):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["generate", "--model", str(ckpt), "--prompt-ids", "1,2,3,4", "--max-tokens", "8", "--ignore-eos"]
    tp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         "-m", "glm5.cli", *args, "--tensor-parallel-size", "2"], env=env, timeout=300,
                        capture_output=True, text=True)
    assert tp.returncode == 0, tp.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "glm5.cli", *args], env=env, timeout=300, capture_output=True,
                         text=True, check=True)
    ids = one.stdout.split()
    assert len(ids) == 8 and tp.stdout.split() == ids  # rank 1 prints nothing
