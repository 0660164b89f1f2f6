"""Column-major CPU weight storage changes strides only: same values, same model outputs, same engine tokens, and
checkpoints written from such a model load back equal."""

import pytest
import torch

from glm5 import GLM5ForCausalLM
from glm5.engine import LLM, SamplingParams
from glm5.engine import cpu_layout

from .conftest import make_model, prompts, ref_greedy


@pytest.fixture
def all_column(monkeypatch):
    """Every shape decides for column-major, whatever this machine's timings say."""
    monkeypatch.setattr(cpu_layout, "_CHOICE", {})
    monkeypatch.setattr(cpu_layout, "_column_major_wins", lambda shape, repeats: True)


def _linears(model):
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_strides_change_values_and_outputs_do_not(all_column, tmp_path):
    model = make_model(seed=5)
    x = torch.randint(1, 2048, (2, 19))
    with torch.no_grad():
        before = model(x).logits
    values = {n: w.clone() for n, w in _linears(model).items()}
    layout = cpu_layout.tune_linear_layouts(model)
    assert set(layout.values()) == {"column"}
    for n, w in _linears(model).items():
        assert torch.equal(w, values[n]) and w.shape == values[n].shape, n
        assert w.stride() == (1, w.shape[0]) and not w.is_contiguous(), n  # stored column by column
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "ckpt")  # the writer makes its own contiguous copies
    loaded = GLM5ForCausalLM.from_pretrained(tmp_path / "ckpt")
    for n, w in _linears(loaded).items():
        assert torch.equal(w, values[n]), n


def test_a_head_tied_to_the_embedding_keeps_its_rows(all_column):
    model = make_model(seed=5)
    model.lm_head.weight = model.model.embed_tokens.weight
    cpu_layout.tune_linear_layouts(model)
    assert model.lm_head.weight.is_contiguous() and model.model.embed_tokens.weight.is_contiguous()
    assert not model.model.layers[0].self_attn.o_proj.weight.is_contiguous()


def test_engine_tokens_with_column_major_weights(all_column):
    ps = prompts([5, 30], seed=2)
    plain = make_model(seed=7)
    want = [ref_greedy(plain, p, 8) for p in ps]  # the unchanged, row-major model
    model = make_model(seed=7)
    llm = LLM(model, max_num_seqs=4, block_size=4)  # cpu_weight_layout="auto": switched here (all_column)
    assert not model.lm_head.weight.is_contiguous()
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == want
    spec = LLM(make_model(seed=7), max_num_seqs=4, block_size=4, num_speculative_tokens=2)
    outs = spec.generate(ps, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == want


def test_row_layout_leaves_the_model_alone_and_bad_values_are_refused(all_column):
    model = make_model(seed=7)
    LLM(model, cpu_weight_layout="row")
    assert all(w.is_contiguous() for w in _linears(model).values())
    with pytest.raises(ValueError, match="cpu_weight_layout"):
        LLM(model, cpu_weight_layout="columns")


def test_the_timing_decision_is_made_once_per_shape(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_layout, "_CHOICE", {})
    monkeypatch.setattr(cpu_layout, "_column_major_wins", lambda shape, repeats: calls.append(shape) or False)
    model = make_model(seed=1)
    first = cpu_layout.tune_linear_layouts(model)
    n = len(calls)
    assert n == len(first) == len(set(calls))
    cpu_layout.tune_linear_layouts(make_model(seed=2))
    assert len(calls) == n  # a second engine on the same shapes reuses the decisions
    assert all(w.is_contiguous() for w in _linears(model).values())  # "row" everywhere: nothing moved
