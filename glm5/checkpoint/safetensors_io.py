"""Sharded safetensors reading and writing (HF layout), with validation at the edge.

Never pickle: only ``*.safetensors`` files are read. Before a file is opened its header is parsed and
checked against the file size, so a truncated download fails with a message naming the file instead
of a crash (or silent garbage) deep inside a tensor read.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, truncated or inconsistent; the message names it."""


def parse_size(size: int | str) -> int:
    """'5GB' -> 5e9 bytes (decimal, as HF), '500MiB' -> 500·2^20, ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r} (examples: 5GB, 500MiB, 1000000)")
    num, unit = float(m.group(1)), (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0] if unit != "B" else "B"]
    return int(num * base ** power)


# safetensors header dtype -> torch dtype (the ones a GLM-5 checkpoint can hold, and a few more)
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_LFS_MAGIC = b"version https://git-lfs"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a shard header describes it (nothing read)."""
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def read_header(path: str | os.PathLike) -> dict:
    """Parse and validate a safetensors header; raise CheckpointError if the file is truncated or corrupt.

    Beyond the size check, every entry must have a dtype torch can hold and a data range matching its shape,
    and safetensors itself must accept the header: whatever it would refuse later, deep inside a load, is
    refused here with the file's name."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = f.read(len(_LFS_MAGIC))
        if start == _LFS_MAGIC:
            # a clone without git-lfs leaves ~130-byte pointer files where the weights should be
            raise CheckpointError(f"{path}: a Git LFS pointer file, not the weights (fetch them: git lfs pull)")
        raw = start[:8]
        f.seek(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: not a JSON object")
    end = 0
    for key, v in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape = ST_DTYPES.get(v["dtype"]), tuple(int(d) for d in v["shape"])
            begin, stop = (int(o) for o in v["data_offsets"])
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key}: {e!r}") from None
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key} has dtype {v['dtype']}, which glm5 cannot load "
                                  f"(supported: {', '.join(ST_DTYPES)})")
        if stop - begin != tensor_nbytes(shape, dtype):
            raise CheckpointError(f"{path}: corrupt safetensors header: {key} {list(shape)} {v['dtype']} needs "
                                  f"{tensor_nbytes(shape, dtype)} bytes, its data range has {stop - begin}")
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, file has {size}")
    try:
        with safe_open(str(path), framework="pt", device="cpu"):
            pass  # parses the header only (the data is mmapped, not read)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return header


def shard_files(path: str | os.PathLike) -> tuple[list[Path], dict[str, str]]:
    """Shard files of a checkpoint dir and the key -> file-name map (from the index, or the single file)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: invalid index file: {e!r}") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: invalid index file: weight_map must map tensor names to file names")
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: listed in {INDEX_NAME} but missing")
        return files, weight_map
    single = path / SINGLE_NAME
    if single.exists():
        header = read_header(single)
        return [single], {k: SINGLE_NAME for k in header if k != "__metadata__"}
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(f"{path}: only pickle checkpoints (*.bin/*.pt) found; glm5 loads safetensors only")
    raise CheckpointError(f"{path}: no {INDEX_NAME} or {SINGLE_NAME}")


def iter_tensors(path: str | os.PathLike, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield (key, tensor, file) shard by shard; each file's header is validated first."""
    files, _ = shard_files(path)
    for f in files:
        read_header(f)
        with safe_open(str(f), framework="pt", device=device) as sf:
            for key in sf.keys():
                yield key, sf.get_tensor(key), f


def inventory(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory, from the shard headers alone (no weights read).

    Each header is validated (read_header); a tensor stored in two shards is an error naming both, since
    which copy a loader would take is arbitrary."""
    path = Path(path)
    files, _ = shard_files(path)
    out: dict[str, TensorInfo] = {}
    for f in files:
        for key, v in read_header(f).items():
            if key == "__metadata__":
                continue
            if key in out:
                raise CheckpointError(f"{path}: {key} is stored twice, in {out[key].file.name} and in {f.name}")
            out[key] = TensorInfo(f, tuple(int(d) for d in v["shape"]), ST_DTYPES[v["dtype"]])
    return out


def tensor_nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def _file_mode() -> int:
    """What ``open(path, "w")`` would give a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_sharded(path: str | os.PathLike, tensors: list[tuple[str, tuple, torch.dtype, callable]],
                  max_shard_size: int | str = "5GB", metadata: dict | None = None) -> dict:
    """Write tensors into HF-style shards.

    tensors: (key, shape, dtype, produce) in file order; ``produce()`` returns the tensor when its shard
    is written, so only one shard is ever materialised. Each shard is written to a temp name and renamed;
    the index is written last, so a killed save never leaves an index pointing at a half-written file.
    Returns the index dict.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards: list[list] = [[]]
    size = 0
    for item in tensors:
        nb = tensor_nbytes(item[1], item[2])
        if shards[-1] and size + nb > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nb
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        data = {}
        for key, shape, dtype, produce in shard:
            t = produce()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise CheckpointError(f"{key}: produced {tuple(t.shape)} {t.dtype}, planned {tuple(shape)} {dtype}")
            data[key] = t.detach().to("cpu").contiguous()
            weight_map[key] = name
            total += tensor_nbytes(shape, dtype)
        tmp = path / (name + ".tmp")
        save_file(data, str(tmp), metadata={"format": "pt", **(metadata or {})})
        os.chmod(tmp, _file_mode())  # safetensors creates 0600 files; a checkpoint is shared like any other file
        os.replace(tmp, path / name)
        del data
    for old in path.glob("model-*-of-*.safetensors"):
        if old.name not in names:
            old.unlink()  # shards of an earlier save with a different shard count
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    if n > 1:
        tmp = path / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, path / INDEX_NAME)
    elif (path / INDEX_NAME).exists():
        (path / INDEX_NAME).unlink()  # a stale index from an earlier multi-shard save would shadow the file
    return index
