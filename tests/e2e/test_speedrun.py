"""`glm5 speedrun --preset smoke` end to end, killed with SIGKILL mid-stage and resumed, then re-run (all skipped)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

TRAIN_STAGES = ("pretrain", "indexer_warmup", "sparse", "sft")


def _speedrun(out: Path) -> list[str]:
    return [sys.executable, "-m", "glm5.cli", "speedrun", "--preset", "smoke", "--out", str(out)]


def _checkpointed_unfinished_stage(out: Path):
    from glm5.train.checkpoint import latest_checkpoint

    for st in TRAIN_STAGES:
        if (out / st / "DONE.json").exists():
            continue
        if latest_checkpoint(out / st / "checkpoints") is not None:
            return st
        return None
    return None


def test_corpus_passages_are_single_documents(small_tokenizer):
    import numpy as np

    from glm5.speedrun import corpus_passages

    tok = small_tokenizer
    eos = tok.eos_token_id
    docs = [tok.encode(f"Scene {i}. Enter the king, with lords and attendants.") for i in range(50)]
    stream = np.asarray([t for d in docs for t in d + [eos]], dtype=np.int64)
    recs = corpus_passages(stream, tok, 40, 12, seed=3)
    assert recs == corpus_passages(stream, tok, 40, 12, seed=3)  # deterministic in seed
    assert len(recs) == 40  # windows that start on an EOS are empty and drawn again
    for r in recs:
        ids = tok.encode(r["text"])
        assert eos not in ids and 0 < len(ids) <= 14  # one document, about the window (decode/encode may shift)
        assert r["text"] in tok.decode(stream.tolist())
    with pytest.raises(ValueError, match="too few"):
        corpus_passages(stream[:10], tok, 5, 12, seed=0)


def test_preset_overrides_are_typed_and_validated():
    from glm5.speedrun import PRESETS, preset_with_overrides

    p = preset_with_overrides("cpu", ["sft_text_fraction=0", "rl_lr=1e-6", "rl_mode=sync", "sft_steps=10"])
    assert (p.sft_text_fraction, p.rl_lr, p.rl_mode, p.sft_steps) == (0.0, 1e-6, "sync", 10)
    assert isinstance(p.sft_text_fraction, float) and PRESETS["cpu"].sft_text_fraction == 0.003  # copy, not edit
    for bad, msg in ((["nope=1"], "unknown preset field"), (["sft_steps=1.5"], "does not fit"),
                     (["rl_mode=3"], "does not fit"), (["sft_steps"], "KEY=VALUE")):
        with pytest.raises(SystemExit, match=msg):
            preset_with_overrides("cpu", bad)
    with pytest.raises(SystemExit, match="unknown preset"):
        preset_with_overrides("tpu")


def test_smoke_speedrun_kill_resume_and_skip(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, GLM5_CACHE=str(tmp_path / "cache"))
    # 1) start, and SIGKILL as soon as a training stage has a complete checkpoint but has not finished
    proc = subprocess.Popen(_speedrun(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_in = None
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        killed_in = _checkpointed_unfinished_stage(out)
        if killed_in:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.05)
    assert killed_in is not None, "no training stage was caught between its first checkpoint and its end"
    assert not (out / killed_in / "DONE.json").exists()
    # 2) run again: finished stages are skipped, the killed stage resumes from its checkpoint
    r = subprocess.run(_speedrun(out), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    done = json.loads((out / killed_in / "DONE.json").read_text())
    assert done["result"]["resumed_from"], f"{killed_in} did not resume from its checkpoint"
    for st in TRAIN_STAGES[: TRAIN_STAGES.index(killed_in)]:
        assert f"[speedrun] {st}: done earlier" in r.stdout
    # 3) everything the pipeline promises is there
    for name in ("report.md", "final/config.json", "final/tokenizer.json", "final-fp8/config.json", "eval/eval.json"):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()
    assert "## Evaluation" in report and "attention_cost.png" in report and "parameters (no MTP)" in report
    for png in ("loss.png", "attention_cost.png", "rl.png"):
        assert (out / "report_figures" / png).stat().st_size > 1000
    # the sparse stage trains the shared MTP layer over the preset's depth (2 for smoke), the others over 1
    assert json.loads((out / "sparse" / "train_config.json").read_text())["mtp_depth"] == 2
    last = [json.loads(line) for line in (out / "sparse" / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in last if m.get("kind") == "train"][-1]["mtp_steps"]) == 2
    assert json.loads((out / "pretrain" / "train_config.json").read_text())["mtp_depth"] == 1
    # SFT mixes corpus passages (trained on every token) into the task conversations
    sft_recs = [json.loads(line) for line in (out / "sft" / "sft_data.jsonl").read_text().splitlines()]
    n_text = sum("text" in r for r in sft_recs)
    assert n_text == 30 and len(sft_recs) - n_text == 120  # smoke: 120 conversations, text fraction 0.2
    # the mtp stage distils the RL policy's MTP layer and nothing else: final = the policy + new drafts
    mtp_cfg = json.loads((out / "mtp" / "train_config.json").read_text())
    assert (mtp_cfg["mtp_only"], mtp_cfg["mtp_target"], mtp_cfg["mtp_depth"]) == (True, "self", 2)
    from safetensors.torch import load_file

    def weights(d):
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    policy, final = weights(out / "rl" / "hf"), weights(out / "final")
    mtp_prefix = f"model.layers.{json.loads((out / 'final' / 'config.json').read_text())['num_hidden_layers']}."
    assert policy.keys() == final.keys()
    changed = {k for k in policy if not torch.equal(policy[k], final[k])}
    assert changed and all(k.startswith(mtp_prefix) for k in changed)
    assert "| mtp |" in report and "policy frozen" in report
    fp8 = json.loads((out / "fp8" / "DONE.json").read_text())["result"]
    assert fp8["fp8_bytes"] < 0.51 * fp8["bf16_or_fp32_bytes"]
    ev = json.loads((out / "eval" / "eval.json").read_text())[1]
    for key in ("val_perplexity", "accuracy", "hallucination_rate", "abstention_rate", "mtp_acceptance_length",
                "decode_tokens_per_s"):
        assert ev[key] is not None, key
    # 4) a third run does nothing but skip
    r = subprocess.run(_speedrun(out), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0
    assert r.stdout.count("done earlier") == 10
    # the result serves: the final model loads in the engine and generates
    from glm5.engine import LLM, SamplingParams

    llm = LLM(str(out / "final"), max_num_seqs=2, max_model_len=256)
    o = llm.generate(["Hello"], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert len(o[0].outputs[0].token_ids) == 5


H100_ON_CPU = ["device=cpu", "model=glm5-nano", "pretrain_steps=6", "pretrain_minutes=0.5", "warmup_steps=3",
               "warmup_minutes=0.3", "sparse_steps=3", "sparse_minutes=0.3", "sft_steps=3", "sft_minutes=0.3",
               "sft_examples=1200", "rl_steps=1", "rl_train_tasks=64", "rl_eval_tasks=16", "eval_tasks=16",
               "eval_ppl_batches=1", "mtp_distill_steps=3", "mtp_distill_minutes=0.3"]


@pytest.mark.slow
def test_h100_preset_shapes_run_on_cpu(tmp_path):
    """The h100 preset has never had a GPU. This runs its shapes — seq_len 1024, batch 32, MTP trained over
    3 steps, RL groups of 16 × 16 prompts with 256-token answers, 256 decode tokens in eval — end to end with
    the model and the step budgets shrunk (glm5-nano on CPU), so that a first GPU run fails only on the
    device."""
    from glm5.speedrun import PRESETS, preset_with_overrides

    p = preset_with_overrides("h100", H100_ON_CPU)
    h = PRESETS["h100"]
    assert (p.seq_len, p.batch_size, p.sparse_mtp_depth, p.rl_group_size, p.rl_groups_per_step,
            p.rl_max_new_tokens) == (h.seq_len, h.batch_size, h.sparse_mtp_depth, h.rl_group_size,
                                     h.rl_groups_per_step, h.rl_max_new_tokens)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "glm5.cli", "speedrun", "--preset", "h100", "--out", str(out)]
    for kv in H100_ON_CPU:
        cmd += ["--set", kv]
    env = dict(os.environ, GLM5_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((out / "sparse" / "train_config.json").read_text())["mtp_depth"] == 3
    assert json.loads((out / "pretrain" / "train_config.json").read_text())["seq_len"] == 1024
    rl = json.loads((out / "rl" / "rl_config.json").read_text())
    assert (rl["group_size"], rl["manager"]["groups_per_step"], rl["rollout"]["max_new_tokens"]) == (16, 16, 256)
    assert (out / "report.md").exists() and (out / "final-fp8" / "config.json").exists()
