"""Tokenise a corpus once into memory-mapped token files plus a manifest.

Layout of a dataset directory::

    train.bin  val.bin       flat token ids, uint16 when the vocabulary fits, else uint32
    manifest.json            format, tokenizer fingerprint, vocab size, dtype, EOS id, sources,
                             per-split counts (tokens, documents, sections, characters) and the
                             unigram baseline (entropy of the train unigram, its cross-entropy on val)

Documents are separated by EOS (``<|endoftext|>``). The validation split is deterministic: every document
is cut at line boundaries into sections of about ``section_chars`` characters and the
``round(val_fraction × n_sections)`` sections with the smallest hash of (seed, source, index) are held out,
so validation text comes from all over the corpus and never overlaps training text.

The directory is built under a temporary name and renamed into place; ``manifest.json`` is written last,
so a directory with a manifest is always complete. ``prepare_dataset`` caches by (sources, tokenizer,
split parameters).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from glm5.data.corpus import iter_documents, resolve_sources, sources_fingerprint

__all__ = ["FORMAT", "MANIFEST", "token_dtype", "split_sections", "tokenize_corpus", "prepare_dataset",
           "read_manifest", "load_tokens", "unigram_baseline", "prepare_tokenizer"]

FORMAT = "glm5-tokens-v1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def split_sections(text: str, section_chars: int) -> list[str]:
    """Cut text after line ends into pieces of at least ``section_chars`` characters (the last may be shorter).
    Joining the pieces gives the text back."""
    if len(text) <= section_chars:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = start + section_chars
        if end >= len(text):
            out.append(text[start:])
            break
        nl = text.find("\n", end)
        if nl < 0:
            out.append(text[start:])
            break
        while nl + 1 < len(text) and text[nl + 1] in "\r\n":  # keep a run of newlines together
            nl += 1
        out.append(text[start:nl + 1])
        start = nl + 1
    return out


def _section_hash(seed: int, source: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{source}\0{index}".encode()).digest()[:8], "little")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def unigram_baseline(train: np.ndarray, val: np.ndarray, vocab_size: int) -> dict:
    """Entropy (nats/token) of the train unigram distribution and the cross-entropy of val under it
    (add-one smoothed): the loss a model that ignores context would get. ``val_cross_entropy`` is None when
    there is no validation text (None, not NaN: the manifest and the run's JSON files stay valid JSON)."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts / max(1.0, counts.sum())
    nz = p > 0
    entropy = float(-(p[nz] * np.log(p[nz])).sum())
    q = (counts + 1.0) / (counts.sum() + vocab_size)
    val_ce = float(-np.log(q[np.asarray(val, dtype=np.int64)]).mean()) if len(val) else None
    return {"train_entropy": entropy, "val_cross_entropy": val_ce}


def tokenize_corpus(sources, tokenizer, out_dir: str | os.PathLike, *, val_fraction: float = 0.02,
                    section_chars: int = 8192, seed: int = 0, text_field: str = "text",
                    encode_batch_chars: int = 1 << 22) -> dict:
    """Tokenise ``sources`` with ``tokenizer`` (a GLM5Tokenizer) into ``out_dir``; return the manifest."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = resolve_sources(sources)
    out_dir = Path(out_dir)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to separate documents")
    vocab = tokenizer.vocab_size
    dtype = token_dtype(vocab)

    # Pass 1: section keys, to choose the held-out sections.
    keys = []
    for doc in iter_documents(files, text_field):
        for i, _ in enumerate(split_sections(doc.text, section_chars)):
            keys.append(_section_hash(seed, doc.source, i))
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * len(keys))) if len(keys) > 1 else 0
    val_hashes = set(sorted(keys)[:n_val])

    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    stats = {s: {"file": f"{s}.bin", "tokens": 0, "documents": 0, "sections": 0, "chars": 0} for s in SPLITS}
    handles = {s: open(tmp / f"{s}.bin", "wb") for s in SPLITS}
    pending = {s: [] for s in SPLITS}  # (text | None for EOS)
    pending_chars = 0

    def flush():
        nonlocal pending_chars
        for s in SPLITS:
            items = pending[s]
            texts = [t for t in items if t is not None]
            enc = iter(tokenizer.encode_batch(texts)) if texts else iter(())
            ids: list[int] = []
            for t in items:
                ids.extend([eos] if t is None else next(enc))
            if ids:
                np.asarray(ids, dtype=dtype).tofile(handles[s])
                stats[s]["tokens"] += len(ids)
            pending[s] = []
        pending_chars = 0

    try:
        for doc in iter_documents(files, text_field):
            used = set()
            for i, sec in enumerate(split_sections(doc.text, section_chars)):
                s = "val" if _section_hash(seed, doc.source, i) in val_hashes else "train"
                pending[s].append(sec)
                used.add(s)
                stats[s]["sections"] += 1
                stats[s]["chars"] += len(sec)
                pending_chars += len(sec)
            for s in used:
                pending[s].append(None)
                stats[s]["documents"] += 1
            if pending_chars >= encode_batch_chars:
                flush()
        flush()
    finally:
        for f in handles.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
    train = np.memmap(tmp / "train.bin", dtype=dtype, mode="r") if stats["train"]["tokens"] else np.zeros(0, dtype)
    val = np.memmap(tmp / "val.bin", dtype=dtype, mode="r") if stats["val"]["tokens"] else np.zeros(0, dtype)
    manifest = {
        "format": FORMAT,
        "tokenizer_fingerprint": tokenizer.fingerprint(include_chat_template=False),
        "vocab_size": vocab,
        "dtype": dtype.name,
        "eos_token_id": eos,
        "sources": [str(f) for f in files],
        "sources_fingerprint": sources_fingerprint(files),
        "val_fraction": val_fraction,
        "section_chars": section_chars,
        "seed": seed,
        "splits": stats,
        "unigram": unigram_baseline(train, val, vocab),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    del train, val
    _write_json_atomic(tmp / MANIFEST, manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return manifest


def _cache_key(files: Iterable[Path], tokenizer, **params) -> str:
    h = hashlib.sha256()
    h.update(sources_fingerprint(files).encode())
    h.update(tokenizer.fingerprint(include_chat_template=False).encode())
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:16]


def prepare_dataset(sources, tokenizer, cache_dir: str | os.PathLike, *, val_fraction: float = 0.02,
                    section_chars: int = 8192, seed: int = 0, text_field: str = "text") -> Path:
    """Return a complete dataset directory for (sources, tokenizer), tokenising only if not cached."""
    files = resolve_sources(sources)
    params = dict(val_fraction=val_fraction, section_chars=section_chars, seed=seed, text_field=text_field, format=FORMAT)
    out = Path(cache_dir) / f"tokens-{_cache_key(files, tokenizer, **params)}"
    if (out / MANIFEST).exists():
        m = read_manifest(out)
        if m.get("tokenizer_fingerprint") == tokenizer.fingerprint(include_chat_template=False):
            return out
    tokenize_corpus(files, tokenizer, out, val_fraction=val_fraction, section_chars=section_chars, seed=seed,
                    text_field=text_field)
    return out


def read_manifest(path: str | os.PathLike) -> dict:
    p = Path(path) / MANIFEST
    if not p.exists():
        raise FileNotFoundError(f"{p.parent}: not a complete token dataset (no {MANIFEST})")
    m = json.loads(p.read_text())
    if m.get("format") != FORMAT:
        raise ValueError(f"{p}: format {m.get('format')!r}, expected {FORMAT!r}")
    return m


def load_tokens(path: str | os.PathLike, split: str = "train") -> np.ndarray:
    """Memory-map one split of a dataset directory (read-only)."""
    m = read_manifest(path)
    info = m["splits"][split]
    f = Path(path) / info["file"]
    if info["tokens"] == 0:
        return np.zeros(0, dtype=np.dtype(m["dtype"]))
    arr = np.memmap(f, dtype=np.dtype(m["dtype"]), mode="r")
    if len(arr) != info["tokens"]:
        raise ValueError(f"{f}: {len(arr)} tokens on disk, manifest says {info['tokens']}")
    return arr



def prepare_tokenizer(sources, vocab_size: int, cache_dir: str | os.PathLike, *, text_field: str = "text"):
    """A byte-level BPE tokenizer (GLM-5 special tokens appended) trained on ``sources``, cached by
    (sources, vocab size). Returns ``(GLM5Tokenizer, directory)``."""
    from glm5.tokenizer.bpe import train_bpe
    from glm5.tokenizer.tokenizer import GLM5Tokenizer

    files = resolve_sources(sources)
    key = hashlib.sha256(f"{sources_fingerprint(files)}\0{vocab_size}\0{text_field}".encode()).hexdigest()[:16]
    out = Path(cache_dir) / f"tokenizer-{vocab_size}-{key}"
    if (out / "tokenizer.json").exists():
        return GLM5Tokenizer.from_pretrained(out), out
    tok = train_bpe((d.text for d in iter_documents(files, text_field)), vocab_size)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return GLM5Tokenizer.from_pretrained(out), out
