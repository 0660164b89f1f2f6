"""End-to-end runs of the Trainer on real text with glm5-nano (a few seconds each)."""

import json

import pytest
import torch

from glm5 import GLM5ForCausalLM
from glm5.train.config import TrainConfig
from glm5.train.trainer import Trainer


def _config(tmp_path, corpus_file, tok_dir, name, **kw):
    base = dict(preset="glm5-nano", data=[str(corpus_file)], tokenizer=str(tok_dir), cache_dir=str(tmp_path / "cache"),
                out=str(tmp_path / name), seq_len=64, batch_size=8, max_steps=40, lr=3e-3, eval_every=20,
                eval_batches=4, ckpt_every=0, progress=False, threads=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus_file, small_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("pretrain")
    t = Trainer(_config(tmp, corpus_file, small_tokenizer_dir, "run"))
    first = t.evaluate()
    summary = t.fit()
    t.close()
    return {"trainer": t, "first_val": first, "summary": summary, "out": tmp / "run", "tmp": tmp}


def test_pretraining_loss_falls_below_unigram_baseline(pretrained):
    first, final = pretrained["first_val"]["val_loss"], pretrained["summary"]["final_val"]["val_loss"]
    baseline = pretrained["summary"]["unigram_baseline"]
    assert final < first - 1.0
    assert final < baseline  # 40 steps of a 1.3M-param model already beat a context-free model
    recs = [json.loads(l) for l in (pretrained["out"] / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 41))
    r = train[-1]
    for key in ("loss", "ce", "mtp", "lr", "grad_norm", "tok_per_s", "tokens", "balance"):
        assert r[key] is not None, key
    assert r["loss"] == pytest.approx(r["ce"] + 0.3 * r["mtp"])
    assert set(r["balance"]["layers"]) == {"1", "2", "3"}  # two MoE layers + the MTP layer
    k = pretrained["trainer"].model_cfg.num_experts_per_tok
    assert {key: sum(v) for key, v in r["expert_load"].items()} == {"1": 512 * k, "2": 512 * k, "3": 512 * k}
    assert train[5]["expert_load"] is None and train[19]["expert_load"] is not None  # at the validation cadence
    assert train[-1]["mtp"] < train[0]["mtp"] - 0.5  # the MTP head learns too
    assert [r["step"] for r in recs if r["kind"] == "val"] == [20, 40]
    assert (pretrained["out"] / "train.png").stat().st_size > 10_000
    assert (pretrained["out"] / "checkpoints" / "step_00000040" / "trainer_state.json").exists()


def test_router_biases_moved(pretrained):
    model = pretrained["trainer"].model
    for _, moe in model.moe_layers():
        b = moe.gate.e_score_correction_bias
        assert b.abs().max() > 0 and b.dtype == torch.float32


def test_export_loads_with_from_pretrained(pretrained):
    from glm5.tokenizer.tokenizer import GLM5Tokenizer

    trainer = pretrained["trainer"]
    hf = pretrained["out"] / "hf"
    loaded = GLM5ForCausalLM.from_pretrained(hf)
    x = torch.randint(0, 2048, (2, 24))
    with torch.no_grad():
        a = trainer.model(x).logits
        b = loaded(x).logits
    assert torch.equal(a, b)
    assert torch.equal(loaded.model.layers[1].mlp.gate.e_score_correction_bias,
                       trainer.model.model.layers[1].mlp.gate.e_score_correction_bias)
    tok = GLM5Tokenizer.from_pretrained(hf)
    assert tok.fingerprint() == trainer.tokenizer.fingerprint()
    assert loaded.config.pad_token_id == tok.pad_token_id and loaded.config.eos_token_ids == tok.eos_token_ids


def test_indexer_warmup_lowers_kl_and_freezes_the_model(pretrained, corpus_file, small_tokenizer_dir):
    hf = pretrained["out"] / "hf"
    cfg = _config(pretrained["tmp"], corpus_file, small_tokenizer_dir, "warmup", init_from=str(hf), tokenizer=None,
                  dsa="indexer-warmup", max_steps=20, lr=1e-2, eval_every=0, export=False, plot=False)
    t = Trainer(cfg)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    first = t.evaluate()["val_indexer_kl"]
    t.fit()
    after = t.model.state_dict()
    last = t.last_val["val_indexer_kl"]
    t.close()
    assert last < 0.8 * first
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".indexer." in k for k in changed)  # router biases and all main weights bit-identical
    recs = [json.loads(l) for l in (pretrained["tmp"] / "warmup" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert train[-1]["loss"] == train[-1]["indexer_kl"] < train[0]["indexer_kl"]


def test_sparse_stage_trains_model_and_indexer(pretrained, corpus_file, small_tokenizer_dir):
    hf = pretrained["out"] / "hf"
    cfg = _config(pretrained["tmp"], corpus_file, small_tokenizer_dir, "sparse", init_from=str(hf), tokenizer=None,
                  dsa="sparse", max_steps=6, eval_every=0, export=False, plot=False)
    t = Trainer(cfg)
    assert t.model.config.index_topk < cfg.seq_len  # attention really is sparse here
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()
    after = t.model.state_dict()
    t.close()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".indexer." in k for k in changed) and "lm_head.weight" in changed
    r = [json.loads(l) for l in (pretrained["tmp"] / "sparse" / "metrics.jsonl").read_text().splitlines()][-2]
    assert r["kind"] == "train" and r["indexer_kl"] > 0
    assert r["loss"] == pytest.approx(r["ce"] + 0.3 * r["mtp"] + r["indexer_kl"])


def test_sft_from_pretrained(pretrained, tmp_path):
    pytest.importorskip("reasoning_gym")
    hf = pretrained["out"] / "hf"
    cfg = TrainConfig(mode="sft", init_from=str(hf), data=["default"], sft_examples=80, cache_dir=str(tmp_path / "c"),
                      out=str(tmp_path / "sft"), seq_len=256, batch_size=4, max_steps=12, lr=3e-3, eval_every=0,
                      eval_batches=2, ckpt_every=0, progress=False, threads=1, plot=False, val_fraction=0.1)
    t = Trainer(cfg)
    assert t.cfg.doc_mask and t.val_loader is not None
    b = next(t.train_loader)
    assert b.attention_mask is not None and 0 < (b.labels != -100).sum() < b.labels.numel()
    first = t.evaluate()["val_loss"]
    summary = t.fit()
    t.close()
    assert summary["final_val"]["val_loss"] < first - 0.5
    assert (tmp_path / "sft" / "hf" / "tokenizer.json").exists()


def test_config_file_and_flags(tmp_path):
    from glm5.cli import build_parser
    from glm5.train.cli import config_from_args

    (tmp_path / "run.toml").write_text('preset = "glm5-nano"\nseq_len = 128\nmax_steps = 7\nlr = 0.01\n'
                                       'model_overrides = { num_hidden_layers = 2 }\n')
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.toml"), "--lr", "0.02", "--no-muon-split",
                                      "--data", "a.txt", "b/", "--set", "index_topk=8", "--adam-betas", "0.9", "0.99"])
    cfg = config_from_args(args, "pretrain")
    assert (cfg.preset, cfg.seq_len, cfg.max_steps, cfg.lr, cfg.muon_split) == ("glm5-nano", 128, 7, 0.02, False)
    assert cfg.data == ["a.txt", "b/"] and cfg.model_overrides == {"num_hidden_layers": 2, "index_topk": 8}
    assert cfg.adam_betas == [0.9, 0.99]
    r = cfg.resolve(world_size=2)
    assert r.warmup_steps == 1 and r.grad_accum == 1 and r.batch_tokens == 2 * 8 * 128
    r = TrainConfig(batch_tokens=8192, batch_size=4, seq_len=256).resolve()
    assert r.grad_accum == 8
    args = build_parser().parse_args(["sft", "--init-from", "x"])
    s = config_from_args(args, "sft")
    assert s.mode == "sft" and s.lr == 5e-4 and s.resolve().doc_mask
    with pytest.raises(ValueError, match="drop --preset"):  # the preset would be silently ignored
        config_from_args(build_parser().parse_args(["sft", "--init-from", "x", "--preset", "glm5-nano"]), "sft")
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"lr": 1, "nope": 2})
    with pytest.raises(ValueError, match="dsa"):
        TrainConfig(dsa="half").resolve()


def test_help_shows_each_commands_defaults(capsys):
    from glm5.cli import build_parser

    for cmd, seq_len, steps in (("train", 256, 1000), ("sft", 512, 300)):
        with pytest.raises(SystemExit):
            build_parser(cmd).parse_args([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert f"--seq-len SEQ_LEN default: {seq_len}" in text and f"--max-steps MAX_STEPS default: {steps}" in text
        assert "(default: glm5-tiny)" in text and "--muon-split, --no-muon-split" in text


def test_time_budget_drives_the_schedule(tmp_path, corpus_file, small_tokenizer_dir):
    assert TrainConfig(max_minutes=1).resolve().warmup_steps == 10  # horizon unknown up front: a fixed warm-up
    cfg = _config(tmp_path, corpus_file, small_tokenizer_dir, "budget", max_minutes=0.1, max_steps=10_000, warmup_steps=2,
                  eval_every=0, export=False, plot=False, schedule="wsd", decay_fraction=0.5, min_lr_ratio=0.0)
    t = Trainer(cfg)
    summary = t.fit()
    t.close()
    assert 4 <= summary["steps"] < 10_000 and 6.0 <= summary["elapsed_s"] < 30
    recs = [json.loads(l) for l in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in recs if r["kind"] == "train"]
    assert lrs[1] == pytest.approx(3e-3) and lrs[-1] < 0.5 * 3e-3  # warm-up, then decayed by the deadline


def test_gradients_are_clipped_before_the_optimiser_step(tmp_path, corpus_file, small_tokenizer_dir):
    """With ``grad_clip`` c the optimiser steps on gradients of global norm min(c, norm) (the reported
    ``grad_norm`` is the norm before clipping); with 0 it steps on the gradients as they are."""
    for clip in (1e-3, 0.0):
        cfg = _config(tmp_path, corpus_file, small_tokenizer_dir, f"clip{clip}", max_steps=1, eval_every=0,
                      export=False, plot=False, grad_clip=clip)
        t = Trainer(cfg)
        stepped = []
        step = t.optim.step

        def record_then_step():
            stepped.append(float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.grad) for p in t.params if p.grad is not None]))))
            step()

        t.optim.step = record_then_step
        rec = t.train_step()
        t.close()
        assert rec["grad_norm"] > 10 * 1e-3  # so that a clip at 1e-3 does act
        assert stepped == [pytest.approx(1e-3 if clip else rec["grad_norm"], rel=1e-4)]


def test_activation_checkpointing_gives_the_same_steps(tmp_path, corpus_file, small_tokenizer_dir):
    runs = []
    for ac in (False, True):
        cfg = _config(tmp_path, corpus_file, small_tokenizer_dir, f"ac{ac}", max_steps=3, eval_every=0, export=False,
                      plot=False, activation_checkpointing=ac, seq_balance_alpha=1e-3, mtp_depth=2)
        t = Trainer(cfg)
        recs = [t.train_step() for _ in range(3)]
        t.close()
        runs.append([(r["loss"], r["grad_norm"], r["balance"]["layers"]) for r in recs])
    for a, b in zip(*runs):
        assert a[0] == pytest.approx(b[0], rel=1e-6) and a[1] == pytest.approx(b[1], rel=1e-5)
        assert a[2] == b[2]  # recomputation in backward is not counted as extra expert load


def test_mtp_only_self_distillation_trains_the_drafts_and_nothing_else(pretrained, corpus_file, small_tokenizer_dir):
    """``mtp_only`` + ``mtp_target=self``: every main-model tensor (embeddings, LM head, router biases) stays
    bit-identical, the MTP block learns to agree with the main model, and the validation loss is unchanged."""
    hf = pretrained["out"] / "hf"
    cfg = _config(pretrained["tmp"], corpus_file, small_tokenizer_dir, "mtp_only", init_from=str(hf), tokenizer=None,
                  mtp_only=True, mtp_target="self", mtp_depth=2, max_steps=30, lr=3e-3, eval_every=30, plot=False)
    t = Trainer(cfg)
    n = t.model_cfg.num_hidden_layers
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    first = t.evaluate()
    t.fit()
    after = t.model.state_dict()
    last = t.last_val
    t.close()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(f"model.layers.{n}.") for k in changed)
    assert f"model.layers.{n}.eh_proj.weight" in changed
    assert f"model.layers.{n}.mlp.gate.e_score_correction_bias" in changed  # the MTP block still balances
    assert last["val_loss"] == pytest.approx(first["val_loss"], abs=1e-6)  # the main model is untouched
    assert len(first["val_mtp_agreement"]) == 2
    # measured: step 1 0.79 -> 0.89, step 2 0.54 -> 0.87, acceptance estimate 2.23 -> 2.66
    assert last["val_mtp_agreement"][0] > first["val_mtp_agreement"][0]
    assert last["val_mtp_agreement"][1] > first["val_mtp_agreement"][1] + 0.1
    assert last["val_mtp_accept_len"] > first["val_mtp_accept_len"] + 0.2
    assert 1.0 <= last["val_mtp_accept_len"] <= 3.0
    recs = [json.loads(l) for l in (pretrained["tmp"] / "mtp_only" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert train[-1]["loss"] == pytest.approx(train[-1]["mtp"])  # the MTP loss alone (a KL: ≥ 0)
    assert 0 <= train[-1]["mtp"] < train[0]["mtp"]
    assert len({round(r["ce"], 6) for r in train}) > 1  # the main CE is still reported per batch
    exported = GLM5ForCausalLM.from_pretrained(pretrained["tmp"] / "mtp_only" / "hf")
    assert torch.equal(exported.state_dict()[f"model.layers.{n}.eh_proj.weight"], after[f"model.layers.{n}.eh_proj.weight"])


def test_mtp_options_are_validated(tmp_path, corpus_file, small_tokenizer_dir):
    cfg = _config(tmp_path, corpus_file, small_tokenizer_dir, "no_mtp", mtp_only=True,
                  model_overrides={"num_nextn_predict_layers": 0})
    with pytest.raises(ValueError, match="no MTP layer"):
        Trainer(cfg)
    with pytest.raises(ValueError, match="mtp_target"):
        TrainConfig(mtp_target="teacher").resolve()
    with pytest.raises(ValueError, match="mtp_depth"):
        TrainConfig(mtp_only=True, mtp_depth=0).resolve()
    with pytest.raises(ValueError, match="indexer-warmup"):
        TrainConfig(mtp_only=True, dsa="indexer-warmup").resolve()


def test_time_budget_follows_the_slowest_rank(tmp_path, monkeypatch, corpus_file, small_tokenizer_dir):
    """With --max-minutes the elapsed time is all-reduced (MAX) once per step, so the schedule and the end are the
    same on every rank. A fake reduction standing in for a rank whose clock is far ahead ends the run after one
    step, though this process's own clock has barely started."""
    import torch.distributed as dist

    import glm5.train.trainer as trainer_mod

    syncs = []

    def slow_rank_ahead(t, op=None):
        if op == dist.ReduceOp.MAX and t.dtype == torch.float64:
            syncs.append(float(t))
            if len(syncs) > 1:  # from the first step on, another rank's clock is past the budget
                t.fill_(1e6)
        return t

    monkeypatch.setattr(trainer_mod, "all_reduce", slow_rank_ahead)
    cfg = _config(tmp_path, corpus_file, small_tokenizer_dir, "budget", max_steps=50, max_minutes=30, seq_len=32,
                  batch_size=2, eval_every=0, eval_batches=1)
    summary = trainer_mod.train(cfg, handle_signals=False)
    assert summary["steps"] == 1 and len(syncs) >= 2
