import json
import os

import numpy as np
import pytest

from glm5.data.corpus import iter_documents, resolve_sources, sources_fingerprint
from glm5.data.tokenize import (load_tokens, prepare_dataset, read_manifest, split_sections, token_dtype,
                                tokenize_corpus, unigram_baseline)


def _mixed_dir(tmp_path):
    d = tmp_path / "src"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("Alpha text.\nSecond line.\n")
    (d / "sub" / "b.md").write_text("# Beta\n")
    (d / "c.jsonl").write_text(json.dumps({"text": "gamma one"}) + "\n\n" + json.dumps({"text": "gamma two"}) + "\n")
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["delta one", "", "delta three"], "id": [1, 2, 3]}), d / "e.parquet")
    return d


def test_sources_files_dirs_and_formats(tmp_path):
    pytest.importorskip("pyarrow")
    d = _mixed_dir(tmp_path)
    files = resolve_sources([d])
    assert [f.name for f in files] == ["a.txt", "c.jsonl", "e.parquet", "b.md"]
    docs = list(iter_documents(files))
    assert [x.text for x in docs] == ["Alpha text.\nSecond line.\n", "gamma one", "gamma two", "delta one",
                                      "delta three", "# Beta\n"]
    assert len({x.source for x in docs}) == len(docs)  # stable, distinct names (used by the val split)
    # A file given directly, twice, is read once.
    assert resolve_sources([d / "a.txt", str(d / "a.txt")]) == [(d / "a.txt").resolve()]


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        resolve_sources([tmp_path / "missing.txt"])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported"):
        resolve_sources([tmp_path / "x.csv"])
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="text"):
        list(iter_documents(resolve_sources([tmp_path / "bad.jsonl"])))


def test_default_corpus_is_shakespeare():
    from glm5.data.corpus import default_corpus_files

    try:
        files = default_corpus_files()
    except FileNotFoundError:
        pytest.skip("shakespeare package not installed")
    assert len(files) >= 40 and all(f.name.endswith("_gut.txt") for f in files)
    assert sum(f.stat().st_size for f in files) > 4_000_000
    assert resolve_sources("default") == [f.resolve() for f in files]


def test_split_sections_round_trip():
    text = "".join(f"line {i}\n" + ("\n" if i % 7 == 0 else "") for i in range(500))
    parts = split_sections(text, 200)
    assert "".join(parts) == text and len(parts) > 5
    assert all(p.endswith("\n") for p in parts)
    assert all(len(p) >= 200 for p in parts[:-1])


def test_tokenize_manifest_and_split(tmp_path, corpus_file, small_tokenizer):
    tok = small_tokenizer
    m = tokenize_corpus([corpus_file], tok, tmp_path / "ds", val_fraction=0.05, section_chars=4096)
    assert m["tokenizer_fingerprint"] == tok.fingerprint(include_chat_template=False)
    assert m["dtype"] == "uint16" == token_dtype(tok.vocab_size).name
    train, val = load_tokens(tmp_path / "ds", "train"), load_tokens(tmp_path / "ds", "val")
    assert isinstance(train, np.memmap) and len(train) == m["splits"]["train"]["tokens"]
    assert len(val) == m["splits"]["val"]["tokens"] > 0
    n_sections = m["splits"]["train"]["sections"] + m["splits"]["val"]["sections"]
    assert m["splits"]["val"]["sections"] == round(0.05 * n_sections)
    eos = tok.eos_token_id
    assert int((train == eos).sum()) == m["splits"]["train"]["documents"] == 1
    # The two splits hold disjoint text that together is the whole corpus (up to the EOS separators).
    text = corpus_file.read_text()
    train_text = tok.decode([int(t) for t in train if t != eos])
    val_text = tok.decode([int(t) for t in val if t != eos])
    assert len(train_text) + len(val_text) == len(text)
    assert m["splits"]["train"]["chars"] + m["splits"]["val"]["chars"] == len(text)
    assert val_text[:300] in text and val_text[:300] not in train_text
    # Deterministic: the same inputs give byte-identical files.
    tokenize_corpus([corpus_file], tok, tmp_path / "ds2", val_fraction=0.05, section_chars=4096)
    for f in ("train.bin", "val.bin"):
        assert (tmp_path / "ds" / f).read_bytes() == (tmp_path / "ds2" / f).read_bytes()
    # The unigram baseline is a real cross-entropy. By Gibbs' inequality it is at least the entropy of val's own
    # unigram distribution. (It need not exceed the *train* entropy: val can be the easier text.)
    u = m["unigram"]
    vc = np.bincount(np.asarray(val, dtype=np.int64), minlength=tok.vocab_size).astype(np.float64)
    pv = vc[vc > 0] / vc.sum()
    val_entropy = float(-(pv * np.log(pv)).sum())
    assert 0 < u["train_entropy"] < np.log(tok.vocab_size)
    assert val_entropy <= u["val_cross_entropy"] < np.log(tok.vocab_size)
    assert abs(u["val_cross_entropy"] - u["train_entropy"]) < 0.5  # same plays: close, not equal


def test_prepare_dataset_caches(tmp_path, corpus_file, small_tokenizer):
    d1 = prepare_dataset([corpus_file], small_tokenizer, tmp_path)
    stamp = os.stat(d1 / "train.bin").st_mtime_ns
    d2 = prepare_dataset([corpus_file], small_tokenizer, tmp_path)
    assert d1 == d2 and os.stat(d2 / "train.bin").st_mtime_ns == stamp
    assert not list(tmp_path.glob("*.tmp-*"))
    d3 = prepare_dataset([corpus_file], small_tokenizer, tmp_path, val_fraction=0.1)
    assert d3 != d1 and read_manifest(d3)["val_fraction"] == 0.1
    # A changed source file is a different dataset.
    os.utime(corpus_file, ns=(stamp + 10**9, stamp + 10**9))
    assert sources_fingerprint([corpus_file]) != read_manifest(d1)["sources_fingerprint"]


def test_incomplete_dataset_is_rejected(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_tokens(tmp_path / "half")


def test_unigram_baseline_uniform():
    v = 16
    train = np.arange(v).repeat(100)
    u = unigram_baseline(train, train, v)
    assert u["train_entropy"] == pytest.approx(np.log(v))
    assert u["val_cross_entropy"] == pytest.approx(np.log(v), rel=1e-6)
