"""torchrun with 2 CPU processes over gloo (FSDP2 + DCP) against one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from glm5 import GLM5ForCausalLM

STEPS = 6
# glm5-nano routes each token to 2 of 8 experts: a 4 x 64-token global batch puts a mean load of 64 on each.
ONE_ASSIGNMENT = 1 / (4 * 64 * 2 / 8)


def _args(out, corpus_file, tok_dir, cache, batch):
    return ["train", "--preset", "glm5-nano", "--data", str(corpus_file), "--tokenizer", str(tok_dir),
            "--cache-dir", str(cache), "--out", str(out), "--max-steps", str(STEPS), "--seq-len", "64",
            "--batch-size", str(batch), "--ckpt-every", "3", "--eval-every", "3", "--eval-batches", "2",
            "--threads", "1", "--no-progress", "--no-plot"]


def _torchrun(args, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "glm5.cli", *args]
    r = subprocess.run(cmd, env=env, timeout=400, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def _records(out, kind):
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r for r in recs if r["kind"] == kind]


def test_fsdp2_two_processes_match_one(tmp_path, corpus_file, small_tokenizer_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cache = tmp_path / "cache"
    fsdp, single = tmp_path / "fsdp", tmp_path / "single"
    # The data cache is filled once so both launches read the same files.
    subprocess.run([sys.executable, "-m", "glm5.cli", *_args(single, corpus_file, small_tokenizer_dir, cache, 4)],
                   env=env, check=True, timeout=300, capture_output=True)
    _torchrun(_args(fsdp, corpus_file, small_tokenizer_dir, cache, 2), env)

    meta = _records(fsdp, "meta")[0]
    assert meta["world_size"] == 2
    a, b = _records(fsdp, "train"), _records(single, "train")
    assert [r["step"] for r in a] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"]  # the same global batch
        for key in ("loss", "ce", "mtp"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), (ra["step"], key)
        # The gradient norm is the more sensitive number: one full-suite CI run saw 2.4514 vs 2.4498 at step 3
        # with every loss equal to 1e-4 (not reproduced in 5 isolated runs). A sharding or reduction bug (a
        # missing average, a shard counted twice) moves it by a factor, far outside 2e-3.
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=2e-3), (ra["step"], "grad_norm")
        # Loads are all-reduced before the bias update (tests/train/test_train_balance_gloo.py checks that
        # directly), so both runs see the same global imbalance. Two reduction orders can still flip a near-tied
        # routing choice: one assignment moves max_vio by 1/mean_load (CI saw 0.6562 vs 0.6719 at step 3). Each
        # flip then nudges a bias the other way, so later steps drift further (CI saw two assignments at step 6).
        slack = ONE_ASSIGNMENT * (1 if ra["step"] == 1 else 4) + 1e-4
        for layer, vio in rb["balance"]["layers"].items():
            assert abs(ra["balance"]["layers"][layer] - vio) <= slack, (ra["step"], layer)
    for va, vb in zip(_records(fsdp, "val"), _records(single, "val")):
        assert va["val_loss"] == pytest.approx(vb["val_loss"], rel=1e-4)
    assert b[-1]["loss"] < b[0]["loss"]

    # The export gathered from the shards loads with from_pretrained and matches the single-process model.
    m_fsdp = GLM5ForCausalLM.from_pretrained(fsdp / "hf")
    m_single = GLM5ForCausalLM.from_pretrained(single / "hf")
    for (n, p), (_, q) in zip(m_fsdp.state_dict().items(), m_single.state_dict().items()):
        assert torch.allclose(p, q, atol=2e-4, rtol=1e-3), n

    # Resume the sharded run from its DCP checkpoint at step 3: steps 4-6 come out the same again.
    again = tmp_path / "again"
    shutil.copytree(fsdp, again)
    shutil.rmtree(again / "checkpoints" / "step_00000006")
    shutil.rmtree(again / "hf")
    _torchrun(_args(again, corpus_file, small_tokenizer_dir, cache, 2), env)
    r1, r2 = _records(fsdp, "train"), _records(again, "train")
    assert [r["step"] for r in r2] == list(range(1, STEPS + 1))
    for x, y in zip(r1[3:], r2[3:]):
        assert (x["loss"], x["ce"], x["grad_norm"]) == (y["loss"], y["ce"], y["grad_norm"])
    assert json.loads((again / "summary.json").read_text())["resumed_from"].endswith("step_00000003")
