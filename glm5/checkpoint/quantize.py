"""``glm5 quantize``: convert a BF16/FP32 GLM-5 checkpoint to the GLM-5-FP8 layout, streaming.

Output: every Linear weight the official GLM-5-FP8 checkpoint quantises becomes ``float8_e4m3fn`` with a
float32 ``weight_scale_inv`` per 128×128 block ([⌈out/128⌉, ⌈in/128⌉], scale = block amax / 448);
norms, the router and its fp32 ``e_score_correction_bias``, the indexer's ``weights_proj`` / ``k_norm``,
embeddings, ``lm_head`` and the MTP ``eh_proj`` / norms stay unquantised, written as bf16 by default (the
router bias stays fp32), as the official checkpoint. ``config.json`` gains a ``quantization_config``
(quant_method fp8, fmt e4m3, activation_scheme dynamic, weight_block_size [128, 128],
modules_to_not_convert in the official per-layer pattern). Other files of the input directory
(generation_config.json, tokenizer files, ...) are copied.

Streaming: the plan (names, shapes, dtypes, output shards) comes from the input shards' headers alone.
Tensors are then read, converted and written in input order, one output shard materialised at a time
(re-sharded by ``max_shard_size``), with at most one input shard open; memory is constant in the number
of shards. ``model.safetensors.index.json`` is written last. Tensors that are already FP8 (with a
``weight_scale_inv``) pass through unchanged, so quantising an FP8 checkpoint is a no-op.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open

from glm5.checkpoint.fp8 import BLOCK, FP8_DTYPE, is_fp8_quantizable, quantization_config, quantize_block, scale_shape
from glm5.checkpoint.hf import FP32_KEYS, _layer_sort_key
from glm5.checkpoint.safetensors_io import INDEX_NAME, SINGLE_NAME, CheckpointError, inventory, write_sharded
from glm5.config import GLM5Config

_SKIP_FILES = {INDEX_NAME, SINGLE_NAME, "config.json"}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class _ShardReader:
    """Reads tensors by (file, key) keeping at most one input shard open (safetensors mmaps it)."""

    def __init__(self):
        self.path: Path | None = None
        self.handle = None
        self.opened: list[Path] = []  # open order, for tests and the report

    def get(self, path: Path, key: str) -> torch.Tensor:
        if path != self.path:
            self.close()
            self.handle = safe_open(str(path), framework="pt", device="cpu")
            self.path = path
            self.opened.append(path)
        return self.handle.get_tensor(key)

    def close(self):
        self.handle, self.path = None, None


def _plan(src: Path):
    """[(input file, key, shape, dtype)] in input order (files by name, keys in model order).

    From the validated shard headers (safetensors_io.inventory: a tensor stored twice is refused); a tensor
    that is not floating point is refused too, since GLM-5 checkpoints hold none and it would be copied on."""
    inv = inventory(src)
    for k, t in inv.items():
        if not t.dtype.is_floating_point:
            raise CheckpointError(f"{t.file}: tensor {k} has dtype {str(t.dtype).removeprefix('torch.')}, "
                                  "expected a floating-point weight")
    entries = [(t.file, k, t.shape, t.dtype) for k, t in inv.items()]
    entries.sort(key=lambda e: (e[0].name, _layer_sort_key(e[1])))
    return entries


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, max_shard_size: int | str = "5GB",
                        unquantized_dtype: torch.dtype | None = torch.bfloat16, rule=is_fp8_quantizable) -> dict:
    """Convert the checkpoint in ``src`` to the GLM-5-FP8 layout in ``dst``; returns a summary dict.

    unquantized_dtype: dtype of the floating tensors that stay unquantised (the fp32 router bias always
    stays fp32); None keeps each tensor's input dtype. rule(file_key, shape) -> bool picks the FP8 tensors.
    """
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").exists():
        raise CheckpointError(f"{src}: no config.json")
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: output directory must differ from the input")
    GLM5Config.from_pretrained(src)  # a malformed or non-GLM-5 config.json fails here, before any work
    t0 = time.perf_counter()
    entries = _plan(src)
    where = {k: f for f, k, _, _ in entries}
    plan_of = {k: (shape, dt) for _, k, shape, dt in entries}
    reader = _ShardReader()
    pending_scales: dict[str, torch.Tensor] = {}
    items, kept, stats = [], [], {"quantized": 0, "passed_through_fp8": 0, "kept": 0}

    def quantized(key, f):
        def produce():
            q, s = quantize_block(reader.get(f, key))
            pending_scales[key + "_scale_inv"] = s
            return q
        return produce

    def scale_of(key, f):
        def produce():
            s = pending_scales.pop(key + "_scale_inv", None)
            if s is None:  # weight landed in a later output shard (cannot happen in input order) – recompute
                s = quantize_block(reader.get(f, key))[1]
            return s
        return produce

    def read(key, f, dtype):
        return lambda: reader.get(f, key).to(dtype)

    for f, key, shape, dt in entries:
        if key.endswith("_scale_inv"):
            if key[: -len("_scale_inv")] not in plan_of:
                raise CheckpointError(f"{f}: {key} has no weight {key[: -len('_scale_inv')]}")
            continue  # emitted right after its weight
        if dt in (torch.float8_e4m3fn, torch.float8_e5m2):
            skey = key + "_scale_inv"
            if skey not in where:
                raise CheckpointError(f"{f}: {key} is float8 but {skey} is missing")
            items.append((key, shape, dt, read(key, f, dt)))
            items.append((skey, plan_of[skey][0], plan_of[skey][1], read(skey, where[skey], plan_of[skey][1])))
            stats["passed_through_fp8"] += 1
        elif dt.is_floating_point and rule(key, shape):
            items.append((key, shape, FP8_DTYPE, quantized(key, f)))
            items.append((key + "_scale_inv", scale_shape(shape, BLOCK), torch.float32, scale_of(key, f)))
            stats["quantized"] += 1
        else:
            out_dt = dt
            if dt.is_floating_point:
                if any(key.endswith(k) for k in FP32_KEYS):
                    out_dt = torch.float32
                elif unquantized_dtype is not None:
                    out_dt = unquantized_dtype
            items.append((key, shape, out_dt, read(key, f, out_dt)))
            kept.append(key)
            stats["kept"] += 1

    # config.json (raw dict: every input field survives byte-for-byte in value) and the side files first;
    # the weight shards next; the index last (write_sharded).
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config(kept, BLOCK)
    if unquantized_dtype is not None:
        name = str(unquantized_dtype).removeprefix("torch.")
        cfg["dtype"] = name
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = name
    tmp = dst / "config.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, dst / "config.json")
    for p in src.iterdir():
        if p.is_file() and p.name not in _SKIP_FILES and not p.name.endswith((".safetensors", ".tmp")):
            shutil.copy2(p, dst / p.name)

    try:
        index = write_sharded(dst, items, max_shard_size)
    finally:
        reader.close()
    disk_in = sum(f.stat().st_size for f in {f for f, *_ in entries})
    disk_out = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    return {
        "source": str(src), "output": str(dst), **stats,
        "input_shards": len({f for f, *_ in entries}), "output_shards": len(set(index["weight_map"].values())),
        "input_shards_opened": [str(p.name) for p in reader.opened],
        "bytes_in": disk_in, "bytes_out": disk_out, "ratio": disk_out / max(1, disk_in),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _run(args) -> int:
    dtype = None if args.unquantized_dtype == "keep" else _DTYPES[args.unquantized_dtype]
    rep = quantize_checkpoint(args.src, args.dst, args.max_shard_size, dtype)
    rep.pop("input_shards_opened")
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(f"{rep['source']} -> {rep['output']}: {rep['quantized']} tensors -> FP8 (128x128 blocks), "
              f"{rep['kept']} kept, {rep['passed_through_fp8']} already FP8; {rep['input_shards']} -> "
              f"{rep['output_shards']} shard(s); {rep['bytes_in']:,} -> {rep['bytes_out']:,} bytes "
              f"({rep['ratio']:.3f}x) in {rep['seconds']:.1f}s")
    return 0


def add_parser(sub):
    p = sub.add_parser("quantize", help="convert a BF16/FP32 checkpoint to the GLM-5-FP8 layout (block FP8)",
                       description="Convert a BF16/FP32 GLM-5 checkpoint to the GLM-5-FP8 layout (float8_e4m3fn "
                                   "weights, fp32 128x128 block scales), streaming shard by shard.")
    p.add_argument("--in", dest="src", required=True, metavar="DIR", help="input checkpoint directory (HF layout)")
    p.add_argument("--out", dest="dst", required=True, metavar="DIR", help="output directory")
    p.add_argument("--max-shard-size", default="5GB", help="output shard size (default 5GB, HF decimal units)")
    p.add_argument("--unquantized-dtype", default="bfloat16", choices=[*_DTYPES, "keep"],
                   help="dtype of tensors kept unquantised (default bfloat16, as the official checkpoint)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_run)
