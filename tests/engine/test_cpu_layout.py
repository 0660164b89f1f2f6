"""Column-major CPU weight storage changes strides only: same values, same model outputs, same engine tokens, and
checkpoints written from such a model load back equal."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glm5 import GLM5ForCausalLM
from glm5.engine import LLM, SamplingParams
from glm5.engine import cpu_layout

from .conftest import make_model, pack_every_head, prompts, ref_greedy


@pytest.fixture(autouse=True)
def own_decisions(monkeypatch, tmp_path):
    """Each test starts with no decisions, in the process or on disk."""
    monkeypatch.setattr(cpu_layout, "_CHOICE", {})
    monkeypatch.setenv("GLM5_CPU_LAYOUT_CACHE", str(tmp_path / "cpu_layout.json"))


@pytest.fixture
def all_column(monkeypatch):
    """Every shape decides for column-major, whatever this machine's timings say."""
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
    monkeypatch.setattr(cpu_layout, "_column_major_wins", lambda shape, repeats: calls.append(shape) or False)
    model = make_model(seed=1)
    first = cpu_layout.tune_linear_layouts(model)
    n = len(calls)
    assert n == len(first) == len(set(calls))
    cpu_layout.tune_linear_layouts(make_model(seed=2))
    assert len(calls) == n  # a second engine on the same shapes reuses the decisions
    assert all(w.is_contiguous() for w in _linears(model).values())  # "row" everywhere: nothing moved


# ---- decisions are the machine's, not the process's ----------------------------------------------------------

def _no_timing(shape, repeats):
    raise AssertionError(f"{shape} was timed again")


def test_decisions_are_written_once_and_read_back(monkeypatch, tmp_path):
    verdict = {}  # an arbitrary but fixed decision per shape, unlike a timing
    monkeypatch.setattr(cpu_layout, "_column_major_wins", lambda shape, repeats: verdict.setdefault(shape, sum(shape) % 3 == 0))
    first = cpu_layout.tune_linear_layouts(make_model(seed=1))
    saved = json.loads((tmp_path / "cpu_layout.json").read_text())
    (entry,) = saved.values()
    assert entry["torch"] == torch.__version__
    threads = torch.get_num_threads()
    assert entry["layouts"] == {f"{a}x{b}@{threads}": v for (a, b), v in first.items()}
    monkeypatch.setattr(cpu_layout, "_CHOICE", {})  # a new process, as far as the module can tell
    monkeypatch.setattr(cpu_layout, "_column_major_wins", _no_timing)
    assert cpu_layout.tune_linear_layouts(make_model(seed=2)) == first


def test_another_machines_decisions_are_not_used(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_layout, "_column_major_wins", lambda shape, repeats: True)
    cpu_layout.tune_linear_layouts(make_model(seed=1))
    monkeypatch.setattr(cpu_layout, "_CHOICE", {})
    monkeypatch.setattr(cpu_layout, "machine_fingerprint", lambda: "another-cpu")
    monkeypatch.setattr(cpu_layout, "_column_major_wins", lambda shape, repeats: False)
    assert set(cpu_layout.tune_linear_layouts(make_model(seed=1)).values()) == {"row"}
    assert len(json.loads((tmp_path / "cpu_layout.json").read_text())) == 2  # both machines kept


@pytest.mark.parametrize("damage", [b"{\"abc", b"[1, 2]", b"{\"x\": 3}", b"\xff\xfe"])
def test_a_damaged_file_is_timed_again_and_rewritten(monkeypatch, tmp_path, damage, caplog):
    path = tmp_path / "cpu_layout.json"
    path.write_bytes(damage)
    monkeypatch.setattr(cpu_layout, "machine_fingerprint", lambda: "x")  # "x": 3 is then this machine's entry
    monkeypatch.setattr(cpu_layout, "_column_major_wins", lambda shape, repeats: True)
    layout = cpu_layout.tune_linear_layouts(make_model(seed=1))
    assert set(layout.values()) == {"column"}
    assert json.loads(path.read_text())["x"]["layouts"]  # valid again, with this machine's decisions


def test_off_and_unwritable_locations_decide_in_the_process(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_layout, "_column_major_wins", lambda shape, repeats: True)
    monkeypatch.setenv("GLM5_CPU_LAYOUT_CACHE", "off")
    assert cpu_layout.decisions_path() is None
    assert set(cpu_layout.tune_linear_layouts(make_model(seed=1)).values()) == {"column"}
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(cpu_layout, "_CHOICE", {})
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("GLM5_CPU_LAYOUT_CACHE", str(tmp_path / "a_file" / "cpu_layout.json"))  # its parent is a file
    with caplog.at_level(logging.WARNING, logger="glm5.engine.cpu_layout"):
        assert set(cpu_layout.tune_linear_layouts(make_model(seed=1)).values()) == {"column"}
    assert "not persisted" in caplog.text


# Two processes meeting the same shapes at the same moment: each "timing" is a coin toss that takes a while, so
# without the lock they would disagree on some of the ~10 shapes; with it the second reads the first's answers.
_RACER = """
import json, random, sys, time
from glm5.engine import cpu_layout
from tests.engine.conftest import make_model
def coin(shape, repeats):
    time.sleep(0.05)
    return random.random() < 0.5
cpu_layout._column_major_wins = coin
layout = cpu_layout.tune_linear_layouts(make_model(seed=1))
print(json.dumps({f"{a}x{b}": v for (a, b), v in layout.items()}))
"""


def test_processes_started_together_make_the_same_decisions(tmp_path):
    env = {**os.environ, "GLM5_CPU_LAYOUT_CACHE": str(tmp_path / "cpu_layout.json"), "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, "-c", _RACER], env=env, cwd=repo, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    a, b = (json.loads(o.strip().splitlines()[-1]) for o in outs)
    assert len(a) >= 5 and a == b


# ---- the LM head pre-packed for oneDNN (products of 2 rows and more) ----------------------------------------------

needs_onednn = pytest.mark.skipif(not cpu_layout._onednn_packing(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("layout", ["row", "column"])
def test_the_packed_head_computes_the_linear(layout):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 1000, bias=False)
    if layout == "column":
        lin.weight.data = lin.weight.data.t().contiguous().t()
    head = cpu_layout.PackedHead(lin)
    with torch.inference_mode():
        for rows in (2, 3, 7, 16, 33):
            x = torch.randn(rows, 96)
            torch.testing.assert_close(head(x), torch.nn.functional.linear(x, lin.weight), rtol=1e-5, atol=1e-5)
        x = torch.randn(1, 5, 96)  # [1, N, H] as the model's own calls shape it
        torch.testing.assert_close(head(x), lin(x), rtol=1e-5, atol=1e-5)
        one = torch.randn(1, 96)
        assert torch.equal(head(one), lin(one))  # one row: the module itself, the same bits as without packing
    assert "_packed_onednn" in lin.__dict__


@needs_onednn
def test_the_packed_copy_follows_new_weights():
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 512, bias=False)
    head = cpu_layout.PackedHead(lin)
    x = torch.randn(4, 64)
    with torch.inference_mode():
        head(x)
        first = lin.__dict__["_packed_onednn"]
        head(x)
        assert lin.__dict__["_packed_onednn"] is first  # packed once, reused
        new = torch.randn(512, 64)
        lin.state_dict()["weight"].copy_(new)  # in place, as glm5.model.weights.load_weights writes
        torch.testing.assert_close(head(x), x @ new.t(), rtol=1e-5, atol=1e-5)
        lin.weight.data = (2 * new).t().contiguous().t()  # new storage (a layout change, a wake-up's restore)
        torch.testing.assert_close(head(x), x @ (2 * new).t(), rtol=1e-5, atol=1e-5)


def test_small_heads_and_the_row_setting_are_not_packed(monkeypatch):
    timed = []
    monkeypatch.setattr(cpu_layout, "_packed_wins", lambda shape, repeats: timed.append(shape) or True)
    llm = LLM(make_model(seed=7))  # glm5-nano's head: 2048 x 128, 1 MB < PACK_MIN_BYTES
    assert llm.engine.runner.head_linear is llm.engine.model.lm_head and not timed
    monkeypatch.setattr(cpu_layout, "PACK_MIN_BYTES", 0)
    llm = LLM(make_model(seed=7), cpu_weight_layout="row")
    assert llm.engine.runner.head_linear is llm.engine.model.lm_head and not timed
    with torch.inference_mode():  # a weight without a version counter: new weights could not be told apart
        model = make_model(seed=7)
    assert cpu_layout.packed_head(model) is None and not timed
    if cpu_layout._onednn_packing():  # the same head made normally is packed
        assert isinstance(cpu_layout.packed_head(make_model(seed=7)), cpu_layout.PackedHead) and timed


def test_engine_tokens_with_a_packed_head(monkeypatch, tmp_path):
    # batch decode, MTP verification (3 rows per sequence) and drafts through the packed head; new weights and a
    # level-2 sleep reach its copy
    pack_every_head(monkeypatch, tmp_path / "cpu_layout.json")
    ps = prompts([5, 30, 12], seed=2)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = [ref_greedy(make_model(seed=7), p, 8) for p in ps]
    for k in (0, 2):
        model = make_model(seed=7)
        llm = LLM(model, max_num_seqs=4, block_size=4, num_speculative_tokens=k)
        assert isinstance(llm.engine.runner.head_linear, cpu_layout.PackedHead)
        assert [o.outputs[0].token_ids for o in llm.generate(ps, sp)] == want
        assert "_packed_onednn" in model.lm_head.__dict__
    other = make_model(seed=8)
    llm.engine.load_weights(other.state_dict())
    assert [o.outputs[0].token_ids for o in llm.generate(ps, sp)] == [ref_greedy(other, p, 8) for p in ps]
    llm.engine.sleep(level=2)
    assert "_packed_onednn" not in model.lm_head.__dict__  # released with the weights
    llm.engine.wake_up()
    llm.engine.load_weights(make_model(seed=7).state_dict())
    assert [o.outputs[0].token_ids for o in llm.generate(ps, sp)] == want
    saved = json.loads((tmp_path / "cpu_layout.json").read_text())
    (entry,) = saved.values()
    assert entry["packed_head"] == {f"2048x128@{torch.get_num_threads()}": "packed"}
