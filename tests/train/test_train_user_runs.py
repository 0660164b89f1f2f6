"""What a user meets first: config files with mistakes, too little data, reruns of the same command, changed
flags on resume, --no-resume in an old run directory, --init-from pointed at a run, Ctrl-C. Each is either
handled or one clear error line; nothing already saved is lost or mixed up."""

import json

import pytest

from glm5.train.config import TrainConfig
from glm5.train.trainer import Trainer


def _cfg(tmp_path, corpus_file, tok_dir, name="run", **kw):
    base = dict(preset="glm5-nano", data=[str(corpus_file)], tokenizer=str(tok_dir), cache_dir=str(tmp_path / "cache"),
                out=str(tmp_path / name), seq_len=32, batch_size=2, max_steps=2, eval_every=0, eval_batches=1,
                ckpt_every=1, progress=False, threads=1, plot=False, export=False)
    base.update(kw)
    return TrainConfig(**base)


def _run(cfg):
    t = Trainer(cfg)
    try:
        return t.fit()
    finally:
        t.close()


def _kinds(out):
    return [(r["kind"], r["step"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_config_file_mistakes_are_one_line_errors(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('max_steps = "3"\n')
    with pytest.raises(ValueError, match=r"run.toml: option max_steps must be an integer, got '3'"):
        TrainConfig.from_file(f)
    f.write_text("seq_len = 64.5\n")
    with pytest.raises(ValueError, match="seq_len must be an integer"):
        TrainConfig.from_file(f)
    f.write_text("max_step = 3\n")
    with pytest.raises(ValueError, match=r"max_step \(did you mean max_steps\?\)"):
        TrainConfig.from_file(f)
    f.write_text('preset = "glm5-nano\n')
    with pytest.raises(ValueError, match=r"run.toml: "):
        TrainConfig.from_file(f)
    f.write_text('data = "corpus.txt"\nlr = 1\nadam_betas = [0.9, 0.99]\n')  # a lone path, an int for a float
    c = TrainConfig.from_file(f)
    assert c.data == ["corpus.txt"] and c.lr == 1.0 and isinstance(c.lr, float)


def test_rerun_of_finished_run_adds_nothing(tmp_path, corpus_file, small_tokenizer_dir):
    cfg = _cfg(tmp_path, corpus_file, small_tokenizer_dir)
    _run(cfg)
    first = _kinds(tmp_path / "run")
    state = json.loads((tmp_path / "run/checkpoints/step_00000002/trainer_state.json").read_text())
    assert state["last_val"]["step"] == 2  # the last checkpoint records the final validation
    _run(cfg)
    assert _kinds(tmp_path / "run") == first == [("meta", 0), ("train", 1), ("train", 2), ("val", 2)]


def test_resume_with_changed_model_or_optimiser_is_a_clear_error(tmp_path, corpus_file, small_tokenizer_dir):
    _run(_cfg(tmp_path, corpus_file, small_tokenizer_dir, max_steps=1))
    for change, name in [({"muon_split": False}, "muon_split True -> False"),  # loaded silently into wrong groups
                         ({"optimizer": "adamw"}, "optimizer 'muon' -> 'adamw'"),
                         ({"model_overrides": {"num_hidden_layers": 2}}, "model_overrides")]:
        with pytest.raises(ValueError, match=f"cannot resume from .*step_00000001.*{name}"):
            Trainer(_cfg(tmp_path, corpus_file, small_tokenizer_dir, max_steps=2, **change))


def test_no_resume_replaces_the_old_run_instead_of_mixing(tmp_path, corpus_file, small_tokenizer_dir):
    _run(_cfg(tmp_path, corpus_file, small_tokenizer_dir, max_steps=3))
    _run(_cfg(tmp_path, corpus_file, small_tokenizer_dir, max_steps=1, resume=False))
    out = tmp_path / "run"
    # the new run's checkpoint survives (it used to be pruned as the oldest) and the old ones are gone
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]
    assert _kinds(out) == [("meta", 0), ("train", 1), ("val", 1)]


def test_small_data_validates_and_too_little_data_says_what_to_change(tmp_path, corpus_file, small_tokenizer_dir):
    text = corpus_file.read_text()
    small = tmp_path / "small.txt"
    small.write_text(text[:40_000])  # one ~8K-character section held out: fewer rows than batch_size
    cfg = _cfg(tmp_path, small, small_tokenizer_dir, seq_len=512, batch_size=8, max_steps=1, ckpt_every=0)
    s = _run(cfg)
    assert s["final_val"] is not None and s["final_val"]["val_tokens"] > 0
    with pytest.raises(ValueError, match=r"too small: .*lower --batch-size or --seq-len"):
        Trainer(_cfg(tmp_path, small, small_tokenizer_dir, "r2", seq_len=512, batch_size=64))
    one = tmp_path / "one.txt"
    one.write_text(text[:3000])  # one section: no validation text at all
    s = _run(_cfg(tmp_path, one, small_tokenizer_dir, "r3", seq_len=32, max_steps=1, ckpt_every=0))
    assert s["unigram_baseline"] is None
    json.loads((tmp_path / "r3" / "summary.json").read_text(), parse_constant=pytest.fail)  # no NaN
    with pytest.raises(ValueError, match=r"tokens, not enough for one row of --seq-len 1024"):
        Trainer(_cfg(tmp_path, one, small_tokenizer_dir, "r4", seq_len=1024))


def test_init_from_a_run_directory_points_at_its_export(tmp_path, corpus_file, small_tokenizer_dir):
    run = tmp_path / "run"
    (run / "hf").mkdir(parents=True)
    (run / "hf" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"its exported model is .*run/hf"):
        Trainer(_cfg(tmp_path, corpus_file, small_tokenizer_dir, "x", init_from=str(run)))
    ck = run / "checkpoints" / "step_00000005"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"training checkpoint: rerun with --out .*run to resume"):
        Trainer(_cfg(tmp_path, corpus_file, small_tokenizer_dir, "x", init_from=str(ck)))


def test_interrupt_inside_a_checkpoint_write_stays_an_interrupt():
    from torch.distributed.checkpoint.api import CheckpointException

    from glm5.train.checkpoint import _dcp

    def boom(exc):
        raise CheckpointException("x", {0: (exc, None)})

    with pytest.raises(KeyboardInterrupt):  # DCP wraps it in a BaseException the CLI reported as a traceback
        _dcp(boom, KeyboardInterrupt())
    with pytest.raises(OSError, match="No space"):
        _dcp(boom, OSError(28, "No space left on device"))


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import glm5.train.trainer as trainer_mod
    from glm5.cli import main

    ck = tmp_path / "run" / "checkpoints" / "step_00000070"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text("{}")

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod, "train", interrupted)
    assert main(["train", "--out", str(tmp_path / "run")]) == 130
    assert f"the same command resumes from {ck}" in capsys.readouterr().err
