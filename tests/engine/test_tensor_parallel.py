"""Tensor parallelism: the split of the weights (one process), and torchrun with 2 CPU ranks over gloo generating
exactly what one process generates (plain, DSA-sparse, sampled, MTP-speculative), plus the CLI and the errors."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from glm5.checkpoint.hf import load_pretrained
from glm5.config import preset
from glm5.engine import LLM, SamplingParams
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
    if name.endswith("gate_up_proj") and not ep:  # each rank holds [its gate rows; its up rows]
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
    with pytest.raises(ValueError, match="unquantised"):
        load_pretrained(ckpt, fp8="keep", tensor_parallel=TensorParallel(0, 2))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        LLM(str(ckpt), tensor_parallel_size=2)
    m = apply_tensor_parallel(GLM5ForCausalLM(CFG).init_weights(0), TensorParallel(0, 2), collectives=False)
    with pytest.raises(ValueError, match="split over 2 rank"):
        LLM(m)  # a sharded model needs its tensor_parallel_size
    with pytest.raises(ValueError, match="already tensor-parallel"):
        apply_tensor_parallel(m, TensorParallel(0, 2))


# One script, run by every rank (SPMD), and by the test process itself as the single-device reference.
_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from glm5.engine import LLM, SamplingParams

    def run(model_dir, tp, spec, ep=False):
        llm = LLM(model_dir, tensor_parallel_size=tp, max_model_len=256, num_speculative_tokens=spec,
                  enable_expert_parallel=ep and tp > 1)
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
        model_dir, out = sys.argv[1], sys.argv[2]
        tp = int(os.environ.get("WORLD_SIZE", "1"))
        res = {"plain": run(model_dir, tp, 0), "mtp": run(model_dir, tp, 2), "ep": run(model_dir, tp, 0, ep=True)}
        with open(f"{out}.{os.environ.get('RANK', '0')}.json", "w") as f:
            json.dump(res, f)
""")


def test_two_ranks_generate_what_one_process_generates(ckpt, tmp_path):
    script = tmp_path / "tp_generate.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(ckpt), str(tmp_path / "tp")]
    r = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    subprocess.run([sys.executable, str(script), str(ckpt), str(tmp_path / "one")], env=env, timeout=300, check=True)
    one, rank0, rank1 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one.0", "tp.0", "tp.1"))
    assert rank0 == rank1  # every rank took the same decisions
    for mode in ("plain", "mtp", "ep"):
        assert rank0[mode]["tokens"] == one[mode]["tokens"], mode  # greedy, seeded and engine-seeded sampling
        for a, b in zip(rank0[mode]["logprobs"], one[mode]["logprobs"]):
            assert a.keys() == b.keys()
            assert all(abs(a[k] - b[k]) < 1e-4 for k in a)
    assert rank0["mtp"]["tokens"][0] == one["plain"]["tokens"][0]  # speculation leaves greedy output unchanged
    assert rank0["mtp"]["acceptance"] == one["mtp"]["acceptance"]


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
