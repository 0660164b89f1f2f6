"""Memory rooflines for the engine benchmarks: the fewest bytes a decode step must read, the device's copy
bandwidth, and the GPU part of ``bench_engine.py`` (``--only gpu``): batch-1 bf16 decode as a fraction of the HBM
roofline, with CUDA graphs, eagerly and with ``compile_decode``, on a model built on the device.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from glm5 import GLM5ForCausalLM, preset
from glm5.engine import LLM, SamplingParams

__all__ = ["activated_weight_bytes", "cache_bytes_read", "copy_bandwidth", "bf16_model_on", "bench_gpu"]


def activated_weight_bytes(model, batch: int = 1) -> int:
    """Bytes of the weights one decode step of ``batch`` sequences reads at the least. Routed experts: the
    expected number of distinct experts that ``batch`` tokens pick under uniform routing, n·(1 − (1 − k/n)^batch)
    of n (exactly top-k at batch 1); everything else once per step."""
    cfg = model.config
    n, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    expert_share = (1.0 - (1.0 - k / n) ** batch) if n else 0.0
    total = 0
    for name, p in model.named_parameters():
        if name.startswith(f"model.layers.{cfg.num_hidden_layers}."):
            continue  # the MTP layer is not part of a plain decode step
        size = p.numel() * p.element_size()
        if name == "model.embed_tokens.weight":
            size = batch * cfg.hidden_size * p.element_size()
        elif ".mlp.experts." in name:
            size = size * expert_share
        total += size
    return int(total)


def cache_bytes_read(cfg, batch: int, context: int, elem: int) -> int:
    """Latent-cache bytes a decode step reads: every latent row [c_kv ‖ k_pe] of the context (only the top-k
    with DSA once the context is longer), and every indexer key when the indexer scores."""
    sparse = context > cfg.index_topk
    rows = min(context, cfg.index_topk) if sparse else context
    per_layer = rows * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + (context * cfg.index_head_dim if sparse else 0)
    return batch * cfg.num_hidden_layers * per_layer * elem


def copy_bandwidth(device) -> float:
    """Bytes/s of a large device copy (read + write), the roofline's memory speed."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    reps = 20 if device.type == "cuda" else 5
    t = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync()
    return 2 * x.numel() * reps / (time.perf_counter() - t)


@torch.no_grad()
def bf16_model_on(dev, cfg) -> GLM5ForCausalLM:
    """A bf16 model built and initialised on the device itself: a GLM-5-shaped model of tens of GB never
    passes through host memory in fp32. Same init law as ``init_weights`` (drawn on the device)."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        with dev:
            model = GLM5ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    g = torch.Generator(device=dev).manual_seed(0)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, cfg.initializer_range, generator=g)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)
    return model.eval()


def bench_gpu(args, results, prompts):
    if not torch.cuda.is_available():
        print("gpu: no CUDA device, skipped", flush=True)
        results["gpu"] = "skipped: no CUDA device"
        return
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    over = {k: int(v) for k, v in (kv.split("=") for kv in args.gpu_override)}
    cfg = preset(args.gpu_preset, **over)
    model = bf16_model_on(dev, cfg)
    make = lambda compile_decode: LLM(model, max_num_seqs=1, max_model_len=args.gpu_context + 256,  # noqa: E731
                                      enable_prefix_caching=False, kv_cache_memory=1 << 30,
                                      compile_decode=compile_decode)
    llm = make(False)
    graphs = llm.engine.runner.graphs
    ids = prompts(1, args.gpu_context, cfg.vocab_size, 0).tolist()
    sp = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    n_dec = args.decode_tokens * 8

    def decode_tok_s(repeats=3, llm=llm):
        llm.generate(ids, sp(8), use_tqdm=False)  # warm-up (and graph capture)
        rates = []
        for _ in range(repeats):  # generate(1 token) times the prefill alone; the difference is n_dec decode steps
            times = []
            for n in (1, 1 + n_dec):
                torch.cuda.synchronize()
                t = time.perf_counter()
                llm.generate(ids, sp(n), use_tqdm=False)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            rates.append(n_dec / (times[1] - times[0]))
        return statistics.median(rates)

    tok_s = decode_tok_s()
    captured = sorted(graphs.graphs) if graphs else None

    def replay_ms(graphs):  # the device time of one decode forward alone (the graph's kernels)
        if not graphs or 1 not in graphs.graphs:
            return None
        graph = graphs.graphs[1][0]
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            graph.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / 50 * 1e3

    plain_replay_ms = replay_ms(graphs)
    compiled = {}
    if args.gpu_compile:  # the same graphs over a torch.compile'd forward
        t = time.perf_counter()
        llm_c = make(True)
        llm_c.generate(ids, sp(2), use_tqdm=False)
        cg = llm_c.engine.runner.graphs
        compiled = dict(compile_s=time.perf_counter() - t, compiled_cuda_graphs=sorted(cg.graphs),
                        compiled_graph_failures=sorted(cg.failed))
        if cg.graphs:
            c_tok_s = decode_tok_s(llm=llm_c)
            same = (llm_c.generate(ids, sp(32), use_tqdm=False)[0].outputs[0].token_ids
                    == llm.generate(ids, sp(32), use_tqdm=False)[0].outputs[0].token_ids)
            compiled.update(compiled_decode_tok_s=c_tok_s, compiled_graph_replay_ms=replay_ms(cg),
                            compiled_same_32_greedy_tokens=same)
        del llm_c
    if args.gpu_profile:  # where the host time of a graph decode step goes
        import cProfile
        import io
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        llm.generate(ids, sp(1 + n_dec), use_tqdm=False)
        torch.cuda.synchronize()
        pr.disable()
        text = io.StringIO()
        st = pstats.Stats(pr, stream=text)
        st.sort_stats("cumulative").print_stats(45)
        st.sort_stats("tottime").print_stats(30)
        with open(args.gpu_profile, "a") as f:
            f.write(f"===== {args.gpu_preset} {over}: host profile of prefill + {n_dec} graph decode steps\n")
            f.write(text.getvalue())
    failed = sorted(graphs.failed) if graphs else None
    llm.engine.runner.graphs = None  # the same engine, decoding eagerly
    eager_tok_s = decode_tok_s()
    if args.gpu_profile:  # where an eager decode step's device time goes (the kernels a graph replays)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate(ids, sp(1 + args.decode_tokens), use_tqdm=False)
            torch.cuda.synchronize()
        with open(args.gpu_profile, "a") as f:
            f.write(f"===== {args.gpu_preset} {over} context {args.gpu_context}: prefill + {args.decode_tokens} "
                    f"eager decode steps, by device time\n")
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=70))
            f.write("\n")
    llm.engine.runner.graphs = graphs
    per_token = activated_weight_bytes(model) + cache_bytes_read(cfg, 1, args.gpu_context, 2)
    roofline = bw / per_token
    if "compiled_decode_tok_s" in compiled:
        compiled["compiled_fraction_of_roofline"] = compiled["compiled_decode_tok_s"] / roofline
    row = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, preset=args.gpu_preset, overrides=over,
               dtype="bfloat16", weight_gb=sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9,
               context=args.gpu_context, measured_bandwidth_gb_s=bw / 1e9, bytes_per_token_mb=per_token / 2**20,
               roofline_tok_s=roofline, decode_tok_s=tok_s, fraction_of_roofline=tok_s / roofline,
               eager_decode_tok_s=eager_tok_s, eager_fraction_of_roofline=eager_tok_s / roofline,
               cuda_graph_speedup=tok_s / eager_tok_s, step_ms=1e3 / tok_s, graph_replay_ms=plain_replay_ms,
               cuda_graphs=captured, cuda_graph_failures=failed, **compiled)
    print(json.dumps(row), flush=True)
    results["gpu"] = row
