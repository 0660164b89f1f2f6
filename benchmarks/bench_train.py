"""Training throughput: glm5 vs transformers' GlmMoeDsaForCausalLM on the same config, weights and batch.

One training step = forward + next-token cross-entropy + backward + AdamW step. Both models get the same
config (ours written to disk and loaded by transformers), the same initial weights and the same batch; the
two are timed in alternation in one process, so machine load affects both alike. Reported: median tokens/s
over the timed steps, and the ratio.

    python benchmarks/bench_train.py                          # glm5-tiny, B=8, T=256, CPU fp32
    python benchmarks/bench_train.py --preset glm5-nano --steps 20
    python benchmarks/bench_train.py --device cuda --preset glm5-1b --batch 8 --seq 4096 --mfu --no-hf

Variants of ours: ``sparse`` (DSA top-k, what HF computes), ``dense`` (our dense-attention stage),
``full`` (our whole objective: + MTP + aux-loss-free balancing bookkeeping). With ``--mfu`` (GPU) the
model-FLOPs utilisation of ours is printed against the bf16 dense peak (H100 SXM: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glm5 import GLM5ForCausalLM, preset  # noqa: E402

# A ~1B-total GLM-5-shaped model for the GPU MFU measurement (every part kept: MLA, DSA, MoE, MTP).
GLM5_1B = dict(vocab_size=32768, hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16,
               intermediate_size=4096, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=48, qk_rope_head_dim=16,
               v_head_dim=64, head_dim=16, index_n_heads=8, index_head_dim=64, index_topk=2048,
               first_k_dense_replace=1, moe_intermediate_size=512, n_routed_experts=48, num_experts_per_tok=6,
               n_shared_experts=1, max_position_embeddings=8192)

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build_config(name: str):
    if name == "glm5-1b":
        return preset("glm5-small", **GLM5_1B)
    return preset(name)


def train_flops_per_token(cfg, seq: int) -> float:
    """Model FLOPs per trained token, forward + backward (= 3 × forward), PaLM-style: 6 × activated matmul
    parameters (routed top-k + shared experts, attention, LM head; no embedding lookup, no MTP) + causal
    attention (QK^T and PV over on average seq/2 keys). The indexer's cheap scoring is not counted, so the
    figure is conservative."""
    from glm5.info import model_stats

    active = model_stats(cfg)["params_activated_per_token"]
    attn_fwd = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq / 2
    return 6 * active + 3 * attn_fwd


def make_batch(vocab: int, batch: int, seq: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def our_step(model, opt, x, y, mode: str, tracker=None, autocast=None):
    import contextlib

    from glm5.data.loader import Batch
    from glm5.train.losses import LossConfig, compute_loss, count_targets

    ctx = autocast() if autocast else contextlib.nullcontext()
    with ctx:
        if mode == "full":
            b = Batch(x, y, torch.arange(x.shape[1], device=x.device).expand_as(x), None)
            loss, _ = compute_loss(model, b, LossConfig(stage="dense", mtp_depth=1), count_targets(b, 1).tolist(),
                                   tracker=tracker)
        else:  # the trainer's head: LM head fused with the CE, chunked (glm5.train.linear_ce)
            from glm5.train.linear_ce import linear_cross_entropy

            out = model(x, dsa=mode, compute_logits=False)
            loss = linear_cross_entropy(out.hidden_states, model.lm_head.weight, y) / y.numel()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if tracker is not None:
        from glm5.train.balance import update_router_biases

        update_router_biases(model, tracker.take_loads(), 1e-3)
    return float(loss.detach())


def hf_step(model, opt, x, y, autocast=None):
    import contextlib

    ctx = autocast() if autocast else contextlib.nullcontext()
    with ctx:
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def plot_sweep(paths: list[str], png: str) -> None:
    """Tokens/s of ours and transformers' best, and their ratio, against sequence length: every run as a point,
    the median per length as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_seq: dict[int, list[tuple[float, float]]] = {}
    for path in paths:
        r = json.loads(Path(path).read_text())
        ours = max(v["tok_per_s"] for k, v in r["results"].items() if k.startswith("glm5["))
        hf = max(v["tok_per_s"] for k, v in r["results"].items() if k.startswith("transformers["))
        by_seq.setdefault(int(r["seq"]), []).append((ours, hf))
    seqs = sorted(by_seq)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (name, color) in enumerate([("glm5", "tab:blue"), ("transformers", "tab:orange")]):
        for s_ in seqs:
            a.scatter([s_] * len(by_seq[s_]), [p[i] for p in by_seq[s_]], color=color, s=12, alpha=0.6)
        a.plot(seqs, [statistics.median(p[i] for p in by_seq[s_]) for s_ in seqs], color=color, label=name)
    for s_ in seqs:
        b.scatter([s_] * len(by_seq[s_]), [o / h for o, h in by_seq[s_]], color="tab:green", s=12, alpha=0.6)
    b.plot(seqs, [statistics.median(o / h for o, h in by_seq[s_]) for s_ in seqs], color="tab:green")
    b.axhline(2.0, color="gray", ls="--", label="target 2×")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs, [str(s_) for s_ in seqs])
        ax.set_xlabel("tokens per sequence (same tokens per step)")
        ax.legend()
    a.set_ylabel("training tokens/s")
    b.set_ylabel("glm5 / transformers")
    fig.suptitle("glm5-tiny training step, CPU fp32 (DSA sparse, same config, weights and batch)")
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="glm5-tiny", help="glm5-nano | glm5-tiny | glm5-small | glm5-1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ours", nargs="+", default=["sparse", "dense", "full"], choices=["sparse", "dense", "full"])
    ap.add_argument("--hf-experts", nargs="+", default=["default", "grouped_mm"],
                    help="transformers experts implementations to time ('default' = as loaded)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile our decoder layers")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=INT", help="config overrides")
    ap.add_argument("--mfu", action="store_true")
    ap.add_argument("--profile", metavar="TXT",
                    help="after timing, profile two steps of each of our variants and write the operators that "
                         "take the most device (CPU: host) time to this file")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--plot-sweep", nargs="+", metavar="JSON",
                    help="plot earlier --json results (runs at several --seq) as tokens/s and speed-up against "
                         "sequence length into --png, then exit")
    ap.add_argument("--png", default="benchmarks/img/train_seq_sweep.png")
    args = ap.parse_args(argv)
    if args.plot_sweep:
        return plot_sweep(args.plot_sweep, args.png)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None
    cfg = build_config(args.preset)
    if args.set:
        cfg = cfg.replace(**{k: int(v) for k, v in (kv.split("=") for kv in args.set)})
    if args.seq > cfg.max_position_embeddings:
        cfg = cfg.replace(max_position_embeddings=args.seq)
    torch.manual_seed(0)
    ours = GLM5ForCausalLM(cfg).init_weights(0).to(dev).train()
    hf_src = None
    if not args.no_hf:
        hf_src = tempfile.mkdtemp(prefix="bench_train_")
        ours.save_pretrained(hf_src)  # the same initial weights for transformers
    if cuda:  # as the trainer: FSDP2 on a one-rank group, bf16 compute / fp32 master weights
        from glm5.train.distributed import apply_fsdp, init_distributed

        apply_fsdp(ours, init_distributed("cuda"), mixed_precision=True)
    if args.compile:
        from glm5.train.distributed import apply_compile

        apply_compile(ours)
    n_params = sum(p.numel() for p in ours.parameters())
    x, y = make_batch(cfg.vocab_size, args.batch, args.seq, dev)
    tokens = args.batch * args.seq

    contenders = {}
    from glm5.train.balance import ExpertLoadTracker

    tracker = ExpertLoadTracker(ours) if "full" in args.ours else None
    for mode in args.ours:
        opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=cuda or None)
        contenders[f"glm5[{mode}]"] = (lambda o=opt, m=mode: our_step(ours, o, x, y, m, tracker if m == "full" else None))
    hf_models = []
    if not args.no_hf:
        from transformers import GlmMoeDsaForCausalLM

        tmp = hf_src
        for impl in args.hf_experts:
            kw = {} if impl == "default" else {"experts_implementation": impl}
            try:
                hf = GlmMoeDsaForCausalLM.from_pretrained(tmp, dtype=torch.float32, **kw).to(dev).train()
            except Exception as e:  # an implementation this transformers build lacks
                print(f"skip transformers[{impl}]: {e}", file=sys.stderr)
                continue
            hf_models.append(hf)
            opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=cuda or None)
            name = f"transformers[{impl}:{hf.config._experts_implementation}]"
            contenders[name] = (lambda h=hf, o=opt: hf_step(h, o, x, y, autocast))

    times = {k: [] for k in contenders}
    for i in range(args.warmup + args.steps):
        for name, fn in contenders.items():  # alternate, so load drifts hit every contender alike
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    res = {"preset": args.preset, "overrides": args.set, "params": n_params, "batch": args.batch, "seq": args.seq, "device": str(dev),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": args.steps, "results": {}}
    print(f"{args.preset}: {n_params / 1e6:.1f}M params, batch {args.batch}×{args.seq}, {dev}, "
          f"{torch.get_num_threads()} threads, {args.steps} timed steps (median)")
    for name, ts in times.items():
        med = statistics.median(ts)
        res["results"][name] = {"median_s": med, "tok_per_s": tokens / med}
        print(f"  {name:42s} {tokens / med:10,.0f} tok/s   ({med * 1000:8.1f} ms/step)")
    hf_names = [k for k in res["results"] if k.startswith("transformers")]
    if hf_names and "glm5[sparse]" in res["results"]:
        best_hf = max(res["results"][k]["tok_per_s"] for k in hf_names)
        ratio = res["results"]["glm5[sparse]"]["tok_per_s"] / best_hf
        res["speedup_vs_best_hf"] = ratio
        print(f"  glm5[sparse] / best transformers: {ratio:.2f}×")
    if args.mfu and cuda:
        name = torch.cuda.get_device_name(dev)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        fpt = train_flops_per_token(cfg, args.seq)
        for mode in args.ours:
            tps = res["results"][f"glm5[{mode}]"]["tok_per_s"]
            mfu = tps * fpt / peak if peak else None
            res["results"][f"glm5[{mode}]"]["mfu"] = mfu
            print(f"  MFU glm5[{mode}] on {name}: " + (f"{100 * mfu:.1f}%" if mfu else "unknown peak"))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    if args.profile:
        profile_steps(contenders, [f"glm5[{m}]" for m in args.ours], cuda, args.profile)
    return res


def profile_steps(contenders: dict, names: list[str], cuda: bool, path: str, steps: int = 2) -> None:
    """Where a step's time goes: torch.profiler over ``steps`` steps per variant, operators by total time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "cuda_time_total" if cuda else "cpu_time_total"
    with open(path, "a") as f:  # appends: several runs can share one file
        for name in names:
            with profile(activities=acts) as prof:
                for _ in range(steps):
                    contenders[name]()
                if cuda:
                    torch.cuda.synchronize()
            f.write(f"===== {name}: {steps} steps, by {key}\n")
            f.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=60) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
