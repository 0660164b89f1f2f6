"""``glm5 eval``: the command end to end on small checkpoints the test makes, and its perplexity checked against
a model whose answer is known (uniform logits: exactly ln V nats per token)."""

import json
import math

import pytest
import torch

from glm5.cli import main
from glm5.config import preset
from glm5.eval.evaluate import EvalConfig, _model_label, format_table, validation_perplexity
from glm5.model.transformer import GLM5ForCausalLM
from glm5.tokenizer import train_bpe

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
        "What is three plus four? Seven. I don't know. ") * 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"Section {i}. {TEXT}" for i in range(30)))
    tok = train_bpe([TEXT], vocab_size=320, min_frequency=1)
    dirs = []
    for name, seed in (("a", 0), ("b", 1)):
        cfg = preset("glm5-nano", vocab_size=tok.vocab_size)
        d = root / name / "hf"
        GLM5ForCausalLM(cfg).init_weights(seed).eval().save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(d)
    return root, corpus, tok, dirs


def test_glm5_eval_compares_two_checkpoints(setup, capsys):
    root, corpus, _, dirs = setup
    out = root / "eval.json"
    rc = main(["eval", "--model", str(dirs[0]), "--model", str(dirs[1]), "--data", str(corpus), "--n-tasks", "6",
               "--max-new-tokens", "6", "--ppl-batches", "2", "--decode-tokens", "4", "--spec-tokens", "2",
               "--cache-dir", str(root / "cache"), "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == [str(d) for d in dirs]
    for r in rows:
        assert r["val_tokens"] > 0 and math.isclose(r["val_perplexity"], math.exp(r["val_loss"]), rel_tol=1e-9)
        assert r["n"] == 6 and 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["abstention_rate"] <= 1.0
        assert 1.0 <= r["mtp_acceptance_length"] <= 3.0 and r["decode_tokens_per_s"] > 0
        assert r["params_total"] > r["params_activated"] > 0
    # different random weights: different perplexities on the same held-out tokens
    assert rows[0]["val_tokens"] == rows[1]["val_tokens"] and rows[0]["val_loss"] != rows[1]["val_loss"]
    table = capsys.readouterr().out
    assert "| a/hf |" in table and "| b/hf |" in table  # OUT/hf exports are named by their run


def test_perplexity_of_uniform_logits_is_the_vocabulary_size(setup):
    root, corpus, tok, dirs = setup
    model = GLM5ForCausalLM.from_pretrained(dirs[0], dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every next-token distribution uniform over V ids
    res = validation_perplexity(model, tok, EvalConfig(data=[str(corpus)], ppl_batches=2, cache_dir=str(root / "cache")))
    assert res["val_loss"] == pytest.approx(math.log(model.config.vocab_size), rel=1e-6)
    assert res["val_perplexity"] == pytest.approx(model.config.vocab_size, rel=1e-5)
    assert res["unigram_loss"] < res["val_loss"]  # the corpus is far from uniform


def test_eval_rejects_a_directory_without_a_checkpoint(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--skip", "ppl", "tasks", "mtp", "speed"]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_labels_and_table():
    assert _model_label("runs/x/sft/hf") == "sft/hf" and _model_label("runs/x/final") == "final"
    row = {"model": "m", "params_total": 2e6, "params_activated": 1e6, "accuracy": 0.5, "accuracy_ci": [0.25, 0.75]}
    line = format_table([row]).splitlines()[2]
    assert line.startswith("| m | 2.0M / 1.0M | — | 50.0% [25–75] |")
