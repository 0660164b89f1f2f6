"""FP8 (GLM-5-FP8 format) benchmark: on-disk size, logit fidelity, and speed.

    python3 benchmarks/bench_fp8.py [--train-steps 150] [--out runs/bench_fp8/results.json]

1. Size: a BF16 save of a model vs ``glm5 quantize`` of it, measured with ``glm5 info`` (real bytes on
   disk), for glm5-tiny, for a small model with GLM-5's proportions (embeddings ≈0.3% of the weights),
   and the full GLM-5 preset (computed by ``glm5 info`` from the module tree; 1.5 TB is not written).
2. Fidelity: a glm5-tiny-shaped model (byte-level, vocab 256) trained briefly on the default corpus
   (Shakespeare, glm5.data.corpus; a built-in English paragraph if it is missing), saved as BF16,
   quantised with ``glm5 quantize``; logits on held-out text vs the fp32 reference: mean KL(ref‖q) per
   token and top-1 agreement, for the BF16 checkpoint (baseline), FP8 weight-only (dequantised load) and
   FP8 w8a8 (weights + dynamic 1×128 activation quantisation, the GPU kernel's numerics, emulated).
   The same on the random-init model.
3. Speed: CPU — FP8Linear's dequantise-on-the-fly fallback vs nn.Linear at GLM-5 shapes, and tiny-model
   greedy decode; GPU (when CUDA is present) — bf16 GEMM vs the block-scaled ``torch._scaled_mm`` FP8
   GEMM at GLM-5 shapes, and decode tokens/s bf16 vs FP8 (glm5-small shape).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glm5 import GLM5ForCausalLM, preset  # noqa: E402
from glm5.checkpoint.hf import load_pretrained  # noqa: E402
from glm5.checkpoint.quantize import quantize_checkpoint  # noqa: E402
from glm5.info import info  # noqa: E402
from glm5.model.fp8_linear import FP8Linear, quantize_model, scaled_mm_available, set_fp8_mode  # noqa: E402

FALLBACK_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair. ") * 400

# GLM-5 projection shapes (out, in): q_a, q_b, kv_a, o_proj, expert gate/up, expert down, dense gate/up
GLM5_SHAPES = {"q_a_proj": (2048, 6144), "q_b_proj": (16384, 2048), "kv_a_proj": (576, 6144),
               "o_proj": (6144, 16384), "expert_gate": (2048, 6144), "expert_down": (6144, 2048),
               "dense_gate": (12288, 6144)}


def corpus() -> tuple[bytes, str]:
    try:
        from glm5.data.corpus import iter_documents, resolve_sources

        docs = list(iter_documents(resolve_sources("default")))
        return "\n\n".join(d.text for d in docs).encode("utf-8", "replace"), "default corpus (Shakespeare, 42 works)"
    except Exception as e:  # noqa: BLE001
        print(f"default corpus unavailable ({e}); using a built-in English paragraph", file=sys.stderr)
        return FALLBACK_TEXT.encode(), "built-in English paragraph (fallback)"


def tiny_byte_config(**over):
    return preset("glm5-tiny", vocab_size=256, pad_token_id=0, eos_token_id=[0], **over)


def train(model, data: torch.Tensor, steps: int, seq: int, batch: int, lr: float, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, (step + 1) / 20) * (0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        idx = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[i:i + seq + 1] for i in idx])
        out = model(x[:, :-1], dsa="dense")
        loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            print(f"  train step {step:4d} loss {loss.item():.3f}", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def logprobs(model, x: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    return torch.cat([model(x[i:i + chunk], dsa="dense").logits.float().log_softmax(-1) for i in range(0, len(x), chunk)])


def compare(ref_lp: torch.Tensor, lp: torch.Tensor, targets: torch.Tensor) -> dict:
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)  # [B,S] KL(ref || q) in nats
    nll = -lp.gather(-1, targets[..., None]).squeeze(-1)
    return {"kl_mean": kl.mean().item(), "kl_p99": kl.flatten().quantile(0.99).item(), "kl_max": kl.max().item(),
            "top1_agree": (ref_lp.argmax(-1) == lp.argmax(-1)).float().mean().item(),
            "bits_per_byte": (nll.mean() / math.log(2)).item()}


def fidelity(model, workdir: Path, x: torch.Tensor, tag: str) -> dict:
    d32, d16, d8 = workdir / f"{tag}_fp32", workdir / f"{tag}_bf16", workdir / f"{tag}_fp8"
    model.save_pretrained(d32)
    model.save_pretrained(d16, dtype=torch.bfloat16)
    q = quantize_checkpoint(d16, d8)
    inp, tgt = x[:, :-1], x[:, 1:]
    ref = logprobs(load_pretrained(d32), inp)
    res = {"reference_fp32": compare(ref, ref, tgt)}
    res["bf16_checkpoint"] = compare(ref, logprobs(load_pretrained(d16), inp), tgt)
    res["fp8_weight_only"] = compare(ref, logprobs(load_pretrained(d8), inp), tgt)
    keep = load_pretrained(d8, fp8="keep")
    set_fp8_mode(keep, "emulate")
    res["fp8_w8a8_emulated"] = compare(ref, logprobs(keep, inp), tgt)
    res["quantize_seconds"] = q["seconds"]
    return res


def sizes(workdir: Path, tiny_model) -> dict:
    out = {}
    prop_cfg = preset("glm5-nano", vocab_size=128, hidden_size=256, num_hidden_layers=2, first_k_dense_replace=1,
                      n_routed_experts=64, num_experts_per_tok=4, moe_intermediate_size=256, intermediate_size=512,
                      q_lora_rank=128, kv_lora_rank=128, num_nextn_predict_layers=0, pad_token_id=0, eos_token_id=[0])
    for tag, model in (("glm5-tiny (vocab 8192)", GLM5ForCausalLM(preset("glm5-tiny")).init_weights(0)),
                       ("GLM-5-proportioned small MoE", GLM5ForCausalLM(prop_cfg).init_weights(0))):
        d16, d8 = workdir / f"size_{len(out)}_bf16", workdir / f"size_{len(out)}_fp8"
        model.save_pretrained(d16, dtype=torch.bfloat16)
        quantize_checkpoint(d16, d8)
        b, f = info(str(d16)), info(str(d8))
        out[tag] = {"params_with_mtp": b["params_total_with_mtp"], "bf16_disk_bytes": b["disk_bytes"],
                    "fp8_disk_bytes": f["disk_bytes"], "ratio": f["disk_bytes"] / b["disk_bytes"]}
    full = info("glm5")
    out["GLM-5 full (glm5 info, computed)"] = {
        "params_with_mtp": full["params_total_with_mtp"], "bf16_disk_bytes": full["bytes_bf16_with_mtp"],
        "fp8_disk_bytes": full["bytes_fp8_with_mtp"], "ratio": full["bytes_fp8_with_mtp"] / full["bytes_bf16_with_mtp"]}
    return out


def _time(fn, reps: int, device) -> float:
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


@torch.no_grad()
def gemm_speed(device: torch.device, dtype: torch.dtype, ms: list[int], shapes: dict, reps: int) -> dict:
    out = {}
    for name, (N, K) in shapes.items():
        lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        torch.nn.init.normal_(lin.weight, std=0.02)
        f8 = FP8Linear.from_linear(lin)
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=dtype)
            row = {"dense_ms": 1e3 * _time(lambda: lin(x), reps, device)}
            for mode in (("scaled_mm", "dequant") if device.type == "cuda" else ("dequant",)):
                f8.mode = mode
                try:
                    row[f"fp8_{mode}_ms"] = 1e3 * _time(lambda: f8(x), reps, device)
                except Exception as e:  # noqa: BLE001
                    row[f"fp8_{mode}_ms"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
            if device.type == "cuda" and isinstance(row.get("fp8_scaled_mm_ms"), float):
                row["tflops_dense"] = 2 * M * N * K / row["dense_ms"] / 1e9
                row["tflops_fp8"] = 2 * M * N * K / row["fp8_scaled_mm_ms"] / 1e9
            out[f"{name} M={M}"] = row
            print(f"  {name:12s} M={M:5d} " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in row.items()), flush=True)
    return out


@torch.no_grad()
def decode_speed(model, device, prompt_len: int = 16, new: int = 32, reps: int = 2) -> float:
    x = torch.randint(1, model.config.vocab_size, (1, prompt_len), device=device)
    model.generate(x, max_new_tokens=4)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        model.generate(x, max_new_tokens=new)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return reps * new / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-seqs", type=int, default=32)
    ap.add_argument("--workdir", default="runs/bench_fp8")
    ap.add_argument("--out", default=None, help="results JSON (default WORKDIR/results.json)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["size", "fidelity", "cpu_speed", "gpu"])
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    res = {"env": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                   "threads": torch.get_num_threads(),
                   "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}

    if "size" not in args.skip:
        print("== size on disk (glm5 info)", flush=True)
        res["size"] = sizes(workdir, None)
        for k, v in res["size"].items():
            print(f"  {k}: bf16 {v['bf16_disk_bytes']:,} B, fp8 {v['fp8_disk_bytes']:,} B, ratio {v['ratio']:.4f}")

    if "fidelity" not in args.skip:
        text, source = corpus()
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        n_eval = args.eval_seqs * (args.seq + 1)
        train_data, eval_data = data[: -n_eval - 1], data[-n_eval:]
        x = eval_data[: n_eval].view(args.eval_seqs, args.seq + 1)
        cfg = tiny_byte_config()
        res["fidelity_setup"] = {"corpus": source, "corpus_bytes": len(text), "model": "glm5-tiny, vocab 256 (bytes)",
                                 "params": sum(p.numel() for p in GLM5ForCausalLM(cfg).parameters()),
                                 "eval_tokens": args.eval_seqs * args.seq, "attention": "dense (DSA off)"}
        model = GLM5ForCausalLM(cfg).init_weights(0)
        print("== fidelity: random init", flush=True)
        res["fidelity_random_init"] = fidelity(model, workdir, x, "rand")
        print(f"== fidelity: training {args.train_steps} steps", flush=True)
        t = time.perf_counter()
        losses = train(model, train_data, args.train_steps, args.seq, args.batch, args.lr)
        res["fidelity_setup"].update(train_steps=args.train_steps, train_seconds=round(time.perf_counter() - t, 1),
                                     train_loss_first=losses[0], train_loss_last10=sum(losses[-10:]) / 10)
        res["fidelity_trained"] = fidelity(model, workdir, x, "trained")
        for tag in ("fidelity_random_init", "fidelity_trained"):
            for k, v in res[tag].items():
                if isinstance(v, dict):
                    print(f"  {tag:22s} {k:20s} KL {v['kl_mean']:.2e} (p99 {v['kl_p99']:.2e}) "
                          f"top1 {v['top1_agree']:.4f} bpb {v['bits_per_byte']:.3f}")

    if "cpu_speed" not in args.skip:
        print("== CPU speed: FP8Linear dequantise fallback vs nn.Linear (fp32)", flush=True)
        cpu = torch.device("cpu")
        res["cpu_gemm"] = gemm_speed(cpu, torch.float32, [1, 16],
                                     {k: GLM5_SHAPES[k] for k in ("q_a_proj", "expert_gate", "o_proj")}, reps=3)
        m = GLM5ForCausalLM(tiny_byte_config()).init_weights(0).eval()
        dense_tps = decode_speed(m, cpu)
        quantize_model(m)
        res["cpu_decode_tiny_tok_s"] = {"fp32": dense_tps, "fp8_dequant_fallback": decode_speed(m, cpu)}
        print(f"  decode glm5-tiny: {res['cpu_decode_tiny_tok_s']}")

    if "gpu" not in args.skip:
        if torch.cuda.is_available():
            dev = torch.device("cuda")
            print(f"== GPU: {torch.cuda.get_device_name()} scaled_mm available: {scaled_mm_available(dev)}", flush=True)
            res["gpu_scaled_mm_available"] = scaled_mm_available(dev)
            res["gpu_gemm"] = gemm_speed(dev, torch.bfloat16, [1, 16, 128, 2048, 8192], GLM5_SHAPES, reps=20)
            cfg = preset("glm5-small")
            m = GLM5ForCausalLM(cfg).init_weights(0).to(dev, torch.bfloat16).eval()
            bf = decode_speed(m, dev, new=64)
            quantize_model(m)
            res["gpu_decode_glm5_small_tok_s"] = {"bf16": bf, "fp8": decode_speed(m, dev, new=64)}
            print(f"  decode glm5-small: {res['gpu_decode_glm5_small_tok_s']}")
        else:
            res["gpu"] = "skipped: no CUDA device"
            print("== GPU: skipped (no CUDA device)")

    out = Path(args.out) if args.out else workdir / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
