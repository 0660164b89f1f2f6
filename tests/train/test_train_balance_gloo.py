"""The router-bias update all-reduces expert loads across ranks: two gloo processes holding different
rank-local loads end with the same biases, equal to one process updating on the summed loads."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glm5 import GLM5ForCausalLM, preset
from glm5.train.balance import update_router_biases

E = preset("glm5-nano").n_routed_experts


def _rank_loads(rank: int) -> dict[int, torch.Tensor]:
    # Chosen so that each rank alone would move some biases the opposite way from the global sum.
    g = torch.Generator().manual_seed(100 + rank)
    return {0: torch.randint(0, 40, (E,), generator=g).float(), 1: torch.randint(0, 40, (E,), generator=g).float()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = GLM5ForCausalLM(preset("glm5-nano")).init_weights(0)
        idx = [i for i, _ in model.moe_layers()][:2]
        loads = {idx[k]: v for k, v in _rank_loads(rank).items()}
        global_loads = update_router_biases(model, loads, rate=0.01)
        biases = {i: moe.gate.e_score_correction_bias.clone() for i, moe in model.moe_layers()}
        torch.save({"loads": global_loads, "biases": biases}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_bias_update_sums_loads_over_ranks(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    single = GLM5ForCausalLM(preset("glm5-nano")).init_weights(0)
    idx = [i for i, _ in single.moe_layers()][:2]
    summed = {idx[k]: _rank_loads(0)[k] + _rank_loads(1)[k] for k in (0, 1)}
    update_router_biases(single, summed, rate=0.01)

    for i in idx:
        assert torch.equal(r0["loads"][i], summed[i]) and torch.equal(r1["loads"][i], summed[i])
    for i, moe in single.moe_layers():
        assert torch.equal(r0["biases"][i], r1["biases"][i])
        assert torch.equal(r0["biases"][i], moe.gate.e_score_correction_bias)
    # The test is only meaningful if a rank-local update would have differed somewhere.
    local = GLM5ForCausalLM(preset("glm5-nano")).init_weights(0)
    update_router_biases(local, {idx[k]: v for k, v in _rank_loads(0).items()}, rate=0.01)
    assert any(not torch.equal(moe.gate.e_score_correction_bias, r0["biases"][i]) for i, moe in local.moe_layers())
