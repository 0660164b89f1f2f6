"""``glm5 info``: parameter counts, activated parameters, weight bytes and latent KV-cache size.

Counts come from the model built on the meta device (nothing allocated), so they are the real module
tree's numbers, not a formula that could drift from it. For a checkpoint directory the real on-disk
bytes are reported too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glm5.checkpoint.fp8 import BLOCK, is_fp8_quantizable
from glm5.checkpoint.hf import param_to_file_items
from glm5.checkpoint.safetensors_io import shard_files
from glm5.config import PRESETS, GLM5Config
from glm5.engine.kv_quant import row_bytes


def model_stats(cfg: GLM5Config) -> dict:
    from glm5.model.transformer import GLM5ForCausalLM

    with torch.device("meta"):
        model = GLM5ForCausalLM(cfg)
    n_main = cfg.num_hidden_layers
    mtp_prefix = f"model.layers.{n_main}."
    total = mtp = embed = routed_main = buffers = 0
    bf16_bytes_fp8 = fp8_bytes = scale_bytes = 0
    for name, p in model.state_dict().items():
        is_buffer = name.endswith("e_score_correction_bias")
        n = p.numel()
        if is_buffer:
            buffers += n
        elif name.startswith(mtp_prefix):
            mtp += n
        else:
            total += n
        if name == "model.embed_tokens.weight":
            embed = n
        if ".mlp.experts." in name and not name.startswith(mtp_prefix):
            routed_main += n
        for key, view in param_to_file_items(name, p, cfg.moe_intermediate_size):
            if is_buffer:
                bf16_bytes_fp8 += view.numel() * 4
            elif is_fp8_quantizable(key, tuple(view.shape)):
                fp8_bytes += view.numel()
                scale_bytes += 4 * (-(-view.shape[0] // BLOCK)) * (-(-view.shape[1] // BLOCK))
            else:
                bf16_bytes_fp8 += 2 * view.numel()
    mtp_buffers = cfg.n_routed_experts if (mtp and cfg.mtp_layer_is_moe) else 0
    k, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    inactive = routed_main * (E - k) // E
    activated = total - embed - inactive  # per token: attention, top-k + shared experts, lm_head
    kv_per_token_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # MLA latent + shared rope key
    idx_per_token_layer = cfg.index_head_dim
    kv_bytes = 2 * (kv_per_token_layer + idx_per_token_layer) * n_main  # bf16
    # kv_cache_dtype="fp8": FlashMLA's fp8_ds_mla latent row + the indexer's e4m3 row (glm5/engine/kv_quant.py)
    kv_bytes_fp8 = (row_bytes(cfg.kv_lora_rank, cfg.qk_rope_head_dim) + row_bytes(cfg.index_head_dim)) * n_main
    return {
        "params_total_no_mtp": total,
        "params_mtp": mtp,
        "params_total_with_mtp": total + mtp,
        "checkpoint_elements_with_mtp": total + mtp + buffers,
        "router_bias_elements": buffers,
        "params_activated_per_token": activated,
        "params_activated_mtp_step": (mtp - (routed_main // max(1, cfg.num_hidden_layers - cfg.first_k_dense_replace)) * (E - k) // E)
        if mtp else 0,
        "bytes_bf16_no_mtp": 2 * total,
        "bytes_bf16_with_mtp": 2 * (total + mtp) + 4 * buffers,
        "bytes_fp8_with_mtp": fp8_bytes + scale_bytes + bf16_bytes_fp8,
        "kv_cache_bytes_per_token_bf16": kv_bytes,
        "kv_cache_bytes_full_context_bf16": kv_bytes * cfg.max_position_embeddings,
        "kv_cache_bytes_per_token_fp8": kv_bytes_fp8,
        "kv_cache_bytes_full_context_fp8": kv_bytes_fp8 * cfg.max_position_embeddings,
        "kv_cache_elements_per_token_layer": {"latent": cfg.kv_lora_rank, "rope_key": cfg.qk_rope_head_dim,
                                              "indexer_key": cfg.index_head_dim},
        "max_position_embeddings": cfg.max_position_embeddings,
        "_unused_mtp_buffers": mtp_buffers,
    }


def per_rank_bytes(cfg: GLM5Config, world: int, expert_parallel: bool = False) -> dict:
    """Weight bytes each of ``world`` tensor-parallel ranks holds (glm5.model.tensor_parallel), in BF16 and with an
    FP8 checkpoint's weights kept FP8, from the shapes alone (meta device). A split the FP8 scale blocks do not
    allow gives the reason instead of a number."""
    from glm5.model.fp8_linear import convert_to_fp8
    from glm5.model.tensor_parallel import TensorParallel, apply_tensor_parallel
    from glm5.model.transformer import GLM5ForCausalLM

    out = {"world": world, "expert_parallel": expert_parallel}
    for kind in ("bf16", "fp8"):
        with torch.device("meta"):
            model = GLM5ForCausalLM(cfg).to(torch.bfloat16)
        if kind == "fp8":
            convert_to_fp8(model)
        try:
            apply_tensor_parallel(model, TensorParallel(0, world, None, expert_parallel), collectives=False)
        except ValueError as e:
            out[f"bytes_{kind}_per_rank"] = str(e)
            continue
        out[f"bytes_{kind}_per_rank"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return out


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _human(n: float, unit: str = "") -> str:
    for suffix in ["", "K", "M", "G", "T", "P"]:
        if abs(n) < 1000 or suffix == "P":
            return f"{n:.3f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return str(n)


def _as_loaded(path: Path, cfg: GLM5Config) -> GLM5Config:
    """The config load_pretrained will use: without MTP when the weights hold no MTP layer (transformers saves
    none). Only the index, or the single file's header, is read."""
    if cfg.num_nextn_predict_layers == 0 or not any(path.glob("*.safetensors")):
        return cfg
    _, weight_map = shard_files(path)
    prefix = f"model.layers.{cfg.num_hidden_layers}."
    return cfg if any(k.startswith(prefix) for k in weight_map) else cfg.replace(num_nextn_predict_layers=0)


def info(target: str, tensor_parallel_size: int = 1, expert_parallel: bool = False) -> dict:
    p = Path(target)
    if p.is_dir() and (p / "config.json").exists():
        cfg = _as_loaded(p, GLM5Config.from_pretrained(p))
        out = {"source": str(p)}
    elif target in PRESETS:
        cfg = GLM5Config.from_pretrained(target)
        out = {"source": f"preset {target}"}
    else:
        raise SystemExit(f"glm5 info: {target!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")
    out.update(model_stats(cfg))
    out.pop("_unused_mtp_buffers")
    if tensor_parallel_size > 1:
        out["tensor_parallel"] = per_rank_bytes(cfg, tensor_parallel_size, expert_parallel)
    if out["source"] == str(p):
        out["disk_bytes"] = disk_bytes(p)
        q = cfg.extra.get("quantization_config")
        out["quantization"] = q.get("quant_method", "none") if isinstance(q, dict) else "none"
    return out


def format_table(st: dict) -> str:
    rows = [
        ("source", st["source"]),
        ("parameters (no MTP)", f"{st['params_total_no_mtp']:,}  ({_human(st['params_total_no_mtp'])})"),
        ("parameters (with MTP)", f"{st['params_total_with_mtp']:,}"),
        ("checkpoint elements (with MTP + fp32 router biases)", f"{st['checkpoint_elements_with_mtp']:,}  "
                                                                f"({_human(st['checkpoint_elements_with_mtp'])})"),
        ("activated per token (incl. lm_head)", f"{st['params_activated_per_token']:,}  ({_human(st['params_activated_per_token'])})"),
        ("weights BF16 (no MTP)", _human(st["bytes_bf16_no_mtp"], "B")),
        ("weights BF16 (with MTP)", _human(st["bytes_bf16_with_mtp"], "B")),
        ("weights FP8 (with MTP, block scales)", _human(st["bytes_fp8_with_mtp"], "B")),
        ("activated per MTP draft step (excl. embedding, lm_head)", f"{st['params_activated_mtp_step']:,}"),
        ("latent KV cache per token (bf16)", f"{st['kv_cache_bytes_per_token_bf16']:,} B"),
        (f"latent KV cache at {st['max_position_embeddings']:,} tokens", _human(st["kv_cache_bytes_full_context_bf16"], "B")),
        ("latent KV cache per token (--kv-cache-dtype fp8)", f"{st['kv_cache_bytes_per_token_fp8']:,} B"),
        (f"  at {st['max_position_embeddings']:,} tokens", _human(st["kv_cache_bytes_full_context_fp8"], "B")),
    ]
    tp = st.get("tensor_parallel")
    if tp:
        where = f"per rank at tensor_parallel_size={tp['world']}" + (" (expert parallel)" if tp["expert_parallel"] else "")
        for kind in ("bf16", "fp8"):
            v = tp[f"bytes_{kind}_per_rank"]
            rows.append((f"weights {kind.upper()} {where}", _human(v, "B") if isinstance(v, int) else v))
    if "disk_bytes" in st:
        rows.append(("on disk (*.safetensors)", f"{st['disk_bytes']:,} B ({_human(st['disk_bytes'], 'B')}), "
                                                f"quantization: {st['quantization']}"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def add_parser(sub):
    p = sub.add_parser("info", help="parameter counts, bytes and KV-cache size of a preset or checkpoint")
    p.add_argument("target", help="preset name (glm5, glm5-nano, ...) or checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="also report the weight bytes each of N tensor-parallel ranks holds")
    p.add_argument("--enable-expert-parallel", action="store_true", help="with -tp: routed experts dealt out whole")

    def run(a):
        st = info(a.target, a.tensor_parallel_size, a.enable_expert_parallel)
        print(json.dumps(st, indent=2) if a.json else format_table(st))

    p.set_defaults(func=run)
