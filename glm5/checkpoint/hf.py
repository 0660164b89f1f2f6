"""GLM-5 checkpoints in the official Hugging Face layout.

Files hold per-expert keys (``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``), the MTP block
as layer ``num_hidden_layers`` and an fp32 ``e_score_correction_bias``; the model holds experts fused
(``experts.gate_up_proj`` [E,2I,H], ``experts.down_proj`` [E,H,I]). This module is the one place that
maps between the two, for loading and for saving.

Loading builds the model on the meta device, materialises it once in the target dtype/device and copies
tensors in shard by shard, so peak memory stays near one copy of the weights. FP8 tensors (those with a
sibling ``weight_scale_inv``) are dequantised block-wise as they stream in.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from glm5.checkpoint.fp8 import BLOCK as FP8_BLOCK
from glm5.checkpoint.fp8 import dequantize_block
from glm5.checkpoint.preflight import check_checkpoint
from glm5.checkpoint.safetensors_io import CheckpointError, read_header, shard_files, write_sharded
from glm5.config import GLM5Config

log = logging.getLogger(__name__)

_EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"
                         r"\.(?P<suffix>weight|weight_scale_inv)$")
FP32_KEYS = ("e_score_correction_bias",)


def file_key_to_param(key: str, intermediate: int) -> tuple[str, tuple]:
    """File key -> (model state-dict name, index into that tensor). Non-expert keys map to themselves."""
    m = _EXPERT_KEY.match(key)
    if not m:
        return key, ()
    e, proj, prefix = int(m["e"]), m["proj"], m["prefix"]
    if m["suffix"] == "weight_scale_inv":
        # FP8 block scales of a per-expert weight -> rows of the fused FP8 experts' scale tensors
        # (glm5.model.fp8_linear.FP8Experts); gate and up are quantised separately, gate block-rows first.
        if proj == "down_proj":
            return f"{prefix}.down_proj_scale_inv", (e,)
        rb = -(-intermediate // FP8_BLOCK)
        rows = slice(0, rb) if proj == "gate_proj" else slice(rb, 2 * rb)
        return f"{prefix}.gate_up_proj_scale_inv", (e, rows)
    if proj == "down_proj":
        return f"{prefix}.down_proj", (e,)
    rows = slice(0, intermediate) if proj == "gate_proj" else slice(intermediate, 2 * intermediate)
    return f"{prefix}.gate_up_proj", (e, rows)


def param_to_file_items(name: str, t: torch.Tensor, intermediate: int):
    """Model state-dict entry -> [(file key, shape, view)] in file order."""
    if name.endswith(".mlp.experts.gate_up_proj"):
        prefix = name[: -len(".gate_up_proj")]
        out = []
        for e in range(t.shape[0]):
            out.append((f"{prefix}.{e}.gate_proj.weight", t[e, :intermediate]))
            out.append((f"{prefix}.{e}.up_proj.weight", t[e, intermediate:]))
        return out
    if name.endswith(".mlp.experts.down_proj"):
        prefix = name[: -len(".down_proj")]
        return [(f"{prefix}.{e}.down_proj.weight", t[e]) for e in range(t.shape[0])]
    return [(name, t)]


def _layer_sort_key(key: str):
    # Files list tensors in model order: globals, then layer by layer, experts in numeric order.
    parts = re.split(r"(\d+)", key)
    return [int(p) if p.isdigit() else p for p in parts]


def save_state_dict(state_dict: dict[str, torch.Tensor], cfg: GLM5Config, path: str | os.PathLike,
                    max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> dict:
    """Write a model state dict (fused experts) as an HF checkpoint with per-expert keys + config.json.

    dtype: cast floating tensors (except the fp32 router bias) to this dtype; default keeps them.
    """
    path = Path(path)
    items = []
    I = cfg.moe_intermediate_size
    for name in sorted(state_dict, key=_layer_sort_key):
        for key, view in param_to_file_items(name, state_dict[name], I):
            out_dtype = view.dtype
            if any(key.endswith(k) for k in FP32_KEYS):
                out_dtype = torch.float32
            elif dtype is not None and view.is_floating_point():
                out_dtype = dtype
            items.append((key, tuple(view.shape), out_dtype, lambda v=view, d=out_dtype: v.detach().to(d)))
    items.sort(key=lambda it: _layer_sort_key(it[0]))
    index = write_sharded(path, items, max_shard_size)
    if dtype is not None:
        cfg = cfg.replace(dtype=str(dtype).removeprefix("torch."))
    cfg.save_pretrained(path)
    gen = {"eos_token_id": cfg.eos_token_ids, "pad_token_id": cfg.pad_token_id, "_from_model_config": True}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return index


def save_pretrained(model, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None) -> dict:
    return save_state_dict(model.state_dict(), model.config, path, max_shard_size, dtype)


def read_generation_config(path: str | os.PathLike, cfg: GLM5Config) -> dict:
    """``generation_config.json`` of a checkpoint directory as a dict ({} when absent), the loaded model's
    ``generation_config`` as in transformers. Its ``eos_token_id`` (an id or a list; GLM-5: the three ids of
    config.json) is checked against the vocabulary and returned as a list, so a stop id that a generator would
    never match fails here instead of being ignored."""
    f = Path(path) / "generation_config.json"
    if not f.exists():
        return {}
    try:
        gen = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: invalid JSON: {e}") from e
    if not isinstance(gen, dict):
        raise CheckpointError(f"{f}: must hold a JSON object, got {type(gen).__name__}")
    eos = gen.get("eos_token_id")
    ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < cfg.vocab_size for i in ids):
        raise CheckpointError(f"{f}: eos_token_id must be token ids below vocab_size {cfg.vocab_size}, got {eos!r}")
    return {**gen, "eos_token_id": ids} if "eos_token_id" in gen else gen


_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype, cfg: GLM5Config) -> torch.dtype:
    """A floating torch dtype from a dtype, its name ("bfloat16", "bf16", ...) or "auto" (config.json's
    ``dtype``, the checkpoint's own, as transformers reads it)."""
    if dtype == "auto":
        dtype = cfg.dtype
    if isinstance(dtype, str):
        dtype = _DTYPE_NAMES.get(dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or dtype not in _DTYPE_NAMES.values():
        raise ValueError(f"dtype: expected float32, bfloat16, float16 or 'auto', got {dtype!r}")
    return dtype


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                    device: str | torch.device = "cpu", strict: bool = True, config: GLM5Config | None = None,
                    fp8: str = "dequantize", tensor_parallel=None, torch_dtype=None):
    """Load an HF-layout GLM-5 checkpoint (BF16/FP32, or FP8).

    dtype: the parameters' dtype: a torch dtype, its name, or "auto" (config.json's ``dtype``, the checkpoint's
    own); ``torch_dtype``, transformers' older name for it, wins when given. The router bias stays fp32.
    The checkpoint is first checked against the config from its shard headers alone
    (glm5.checkpoint.preflight), so a bad or mismatched file fails before anything is allocated.
    fp8: what to do with FP8 tensors (decided per tensor: a float8 ``X.weight`` with a sibling
    ``X.weight_scale_inv``). "dequantize" (default): block-wise dequantise to ``dtype`` while streaming.
    "keep": the matching Linear / routed-expert modules become glm5.model.fp8_linear FP8 modules holding
    the FP8 weights and scales as stored (block-scaled FP8 GEMM on sm90 GPUs, dequantise-on-the-fly
    elsewhere); everything else loads in ``dtype``.
    tensor_parallel: a glm5.model.tensor_parallel.TensorParallel; the model is built sharded for that rank and
    reads only its slice of each split tensor (FP8 tensors are dequantised whole, then sliced).
    """
    from glm5.model.transformer import GLM5ForCausalLM

    if fp8 not in ("dequantize", "keep"):
        raise ValueError(f"fp8 must be 'dequantize' or 'keep', got {fp8!r}")

    path = Path(path)
    if torch.device(device).type == "meta":
        raise ValueError("device='meta' would load no weights; to inspect shapes without memory, build "
                         "GLM5ForCausalLM(GLM5Config.from_pretrained(path)) under `with torch.device('meta'):`")
    cfg = config or GLM5Config.from_pretrained(path)
    dtype = resolve_dtype(torch_dtype if torch_dtype is not None else dtype, cfg)
    files, weight_map = shard_files(path)
    mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
    if cfg.num_nextn_predict_layers > 0 and not any(k.startswith(mtp_prefix) for k in weight_map):
        # transformers drops the MTP layer on save; load the main model and disable MTP.
        log.warning("%s has no MTP weights (layer %d); loading without the MTP module", path, cfg.num_hidden_layers)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = GLM5ForCausalLM(cfg)
    skip = check_checkpoint(path, cfg, model.state_dict(), fp8, strict)  # headers only, before any allocation
    model = model.to(dtype)
    if fp8 == "keep":
        from glm5.model.fp8_linear import convert_to_fp8

        convert_to_fp8(model, {k[: -len("_scale_inv")] for k in weight_map if k.endswith(".weight_scale_inv")})
    tp = tensor_parallel
    if tp is not None:  # after the FP8 swap: FP8 weights are split with their scale blocks
        from glm5.model.tensor_parallel import apply_tensor_parallel, file_slice, local_expert_key

        apply_tensor_parallel(model, tp)  # parameter shapes become this rank's
    model = model.to_empty(device=device)
    targets = model.state_dict(keep_vars=True)
    filled = {name: 0 for name in targets}
    unexpected = []
    # rows of each routed expert on this rank: all of them unless tensor parallelism splits every expert
    I = cfg.moe_intermediate_size // (tp.world if tp is not None and not tp.expert_parallel else 1)
    open_files: dict[Path, object] = {}

    def scale_for(key: str) -> torch.Tensor:
        skey = key + "_scale_inv"
        if skey not in weight_map:
            raise CheckpointError(f"{key}: stored as float8 but {skey} is missing")
        f = path / weight_map[skey]
        if f not in open_files:
            open_files[f] = safe_open(str(f), framework="pt", device="cpu")
        return open_files[f].get_tensor(skey)

    with torch.no_grad():
        for f in files:
            read_header(f)
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for key in sf.keys():
                    if key in skip:
                        continue  # the MTP layer of a config without MTP
                    local_key = key if tp is None else local_expert_key(key, tp, cfg.n_routed_experts)
                    if local_key is None:
                        continue  # expert parallelism: another rank's expert, never read here
                    name, idx = file_key_to_param(local_key, I)
                    if key.endswith("_scale_inv") and name not in targets:
                        continue  # consumed with its weight (dequantised)
                    part = file_slice(key, tuple(sf.get_slice(key).get_shape()), tp) if tp is not None else None
                    t = sf.get_tensor(key) if part is None or key + "_scale_inv" in weight_map else \
                        sf.get_slice(key)[part]  # only this rank's rows / columns are read
                    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and not (
                            name in targets and targets[name].dtype == t.dtype):
                        t = dequantize_block(t, scale_for(key), dtype=torch.float32)
                    if part is not None and key + "_scale_inv" in weight_map:
                        t = t[part]  # FP8: scale blocks span the split, so dequantise whole, then slice
                    if name not in targets:
                        unexpected.append(key)
                        continue
                    dest = targets[name][idx] if idx else targets[name]
                    if tuple(dest.shape) != tuple(t.shape):
                        raise CheckpointError(f"{key} in {f.name}: shape {tuple(t.shape)}, model expects {tuple(dest.shape)}")
                    dest.copy_(t)
                    filled[name] += t.numel()
    missing = [n for n, t in targets.items() if filled[n] != t.numel()]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(f"{path}: " + "; ".join(parts))
    if missing or unexpected:
        log.warning("%s: %d missing, %d unexpected tensors", path, len(missing), len(unexpected))
    model.generation_config = read_generation_config(path, cfg)
    return model.eval()
