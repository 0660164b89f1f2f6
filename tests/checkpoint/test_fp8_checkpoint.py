"""``glm5 quantize`` and FP8 checkpoint loading: the GLM-5-FP8 layout key by key, streaming, config,
sizes (``glm5 info``), dequantise vs keep-FP8 loading, per-tensor decisions, and transformers' loader."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import glm5.checkpoint.quantize as qmod
from glm5 import GLM5ForCausalLM, preset
from glm5.checkpoint.fp8 import BLOCK, FP8_DTYPE, dequantize_block, is_fp8_quantizable
from glm5.checkpoint.hf import load_pretrained
from glm5.checkpoint.quantize import quantize_checkpoint
from glm5.checkpoint.safetensors_io import INDEX_NAME, CheckpointError, shard_files
from glm5.cli import main as cli_main
from glm5.info import info
from glm5.model.fp8_linear import (FP8Experts, FP8Linear, dequantize_model, fp8_modules, quantize_model,
                                   set_fp8_mode)

# Every quantised dimension is ≤128 or a multiple of 128 (see test_transformers_loads_our_fp8_checkpoint).
ALIGNED = dict(v_head_dim=8)


def make_model(seed=0, **over):
    cfg = preset("glm5-nano", **over)
    model = GLM5ForCausalLM(cfg).init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, moe in model.moe_layers():
            moe.gate.e_score_correction_bias.copy_(torch.randn(moe.n_experts, generator=g) * 0.05)
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def read_all(d: Path) -> dict:
    files, _ = shard_files(d)
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    model = make_model(**ALIGNED)
    root = tmp_path_factory.mktemp("fp8")
    bf16, fp8 = root / "bf16", root / "fp8"
    model.save_pretrained(bf16, max_shard_size="300KB", dtype=torch.bfloat16)
    (bf16 / "tokenizer_config.json").write_text("{}\n")
    assert cli_main(["quantize", "--in", str(bf16), "--out", str(fp8), "--max-shard-size", "250KB"]) == 0
    return model, bf16, fp8


def test_fp8_checkpoint_layout_key_by_key(ckpts):
    """The layout transformers' FineGrainedFP8 loader (and vLLM/SGLang) expect, checked tensor by tensor."""
    _, bf16, fp8 = ckpts
    src, out = read_all(bf16), read_all(fp8)
    n_fp8 = 0
    for key, t in src.items():
        assert key in out, key
        if is_fp8_quantizable(key, tuple(t.shape)):
            n_fp8 += 1
            q, s = out[key], out[key + "_scale_inv"]
            assert q.dtype == FP8_DTYPE and tuple(q.shape) == tuple(t.shape), key
            assert s.dtype == torch.float32 and tuple(s.shape) == (-(-t.shape[0] // BLOCK), -(-t.shape[1] // BLOCK))
            err = (dequantize_block(q, s) - t.float()).abs().max() / t.float().abs().max()
            assert err <= 2 ** -4, key
        else:
            assert key + "_scale_inv" not in out
            want = torch.float32 if key.endswith("e_score_correction_bias") else torch.bfloat16
            assert out[key].dtype == want, key
            assert torch.equal(out[key], t), key
    assert set(out) == set(src) | {k + "_scale_inv" for k in src if is_fp8_quantizable(k, tuple(src[k].shape))}
    kinds = {k.split(".")[-2] for k in src if is_fp8_quantizable(k, tuple(src[k].shape))}
    assert kinds == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "wq_b", "wk",
                     "gate_proj", "up_proj", "down_proj"}
    assert n_fp8 > 50
    # index written (multi-shard), consistent, no temp files left; side files copied
    index = json.loads((fp8 / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(out)
    assert not list(fp8.glob("*.tmp"))
    assert (fp8 / "tokenizer_config.json").exists() and (fp8 / "generation_config.json").exists()


def test_fp8_quantization_config(ckpts):
    model, bf16, fp8 = ckpts
    cfg = json.loads((fp8 / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "fmt", "activation_scheme", "weight_block_size")} == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    skip = set(qc["modules_to_not_convert"])
    L = model.config.num_hidden_layers  # MTP block = layer L
    for i in range(L + 1):
        for m in ("input_layernorm", "post_attention_layernorm", "self_attn.q_a_layernorm", "self_attn.kv_a_layernorm",
                  "self_attn.indexer.k_norm", "self_attn.indexer.weights_proj",
                  "self_attn.indexers_proj"):  # the official checkpoint's misspelling, kept deliberately
            assert f"model.layers.{i}.{m}" in skip, (i, m)
        moe = i >= model.config.first_k_dense_replace
        assert (f"model.layers.{i}.mlp.gate" in skip) == moe
        assert (f"model.layers.{i}.mlp.gate.e_score_correction_bias" in skip) == moe
    for m in ("model.embed_tokens", "lm_head", "model.norm", f"model.layers.{L}.enorm", f"model.layers.{L}.hnorm",
              f"model.layers.{L}.eh_proj", f"model.layers.{L}.shared_head.norm"):
        assert m in skip
    assert not any("q_a_proj" in m or "experts" in m or "wq_b" in m for m in skip)
    # every other field of the input config survives
    src = json.loads((bf16 / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k not in ("quantization_config", "dtype")} == \
           {k: v for k, v in src.items() if k != "dtype"}
    assert cfg["dtype"] == "bfloat16"
    # our config class keeps it in extra (round trip)
    from glm5.config import GLM5Config
    assert GLM5Config.from_pretrained(fp8).extra["quantization_config"] == qc


def test_fp8_quantize_streams_one_input_shard_at_a_time(ckpts, tmp_path, monkeypatch):
    _, bf16, _ = ckpts
    opened, live, peak = [], [0], [0]
    real = qmod.safe_open

    class Tracked:
        def __init__(self, path, **kw):
            self.h = real(path, **kw)
            opened.append(Path(path).name)
            live[0] += 1
            peak[0] = max(peak[0], live[0])

        def get_tensor(self, k):
            return self.h.get_tensor(k)

        def __del__(self):
            live[0] -= 1

    monkeypatch.setattr(qmod, "safe_open", Tracked)
    rep = quantize_checkpoint(bf16, tmp_path / "o", max_shard_size="120KB")
    files, _ = shard_files(bf16)
    assert rep["input_shards"] == len(files) > 3 and rep["output_shards"] > rep["input_shards"]
    assert opened == [f.name for f in files]  # each input shard read once, in order
    assert peak[0] <= 2  # the previous handle is being released while the next opens
    assert read_all(tmp_path / "o").keys() == read_all(ckpts[2]).keys()


def test_fp8_checkpoint_loads_dequantized_and_kept(ckpts):
    model, bf16, fp8 = ckpts
    x = torch.randint(1, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    deq = load_pretrained(fp8)  # default: dequantise to fp32
    assert not fp8_modules(deq)
    keep = GLM5ForCausalLM.from_pretrained(fp8, fp8="keep")
    kinds = {type(keep.get_submodule(n)) for n in fp8_modules(keep)}
    assert kinds == {FP8Linear, FP8Experts}
    assert isinstance(keep.lm_head, torch.nn.Linear) and keep.lm_head.weight.dtype == torch.float32
    assert isinstance(keep.model.layers[0].self_attn.indexer.weights_proj, torch.nn.Linear)
    # kv_b_proj is stored FP8 but dequantised at load: MLA decode absorbs its weight (engine path)
    kvb = keep.model.layers[0].self_attn.kv_b_proj
    assert type(kvb) is torch.nn.Linear and kvb.weight.dtype == torch.float32
    assert keep.model.layers[0].self_attn.absorbed_weights()[0].dtype == torch.float32
    assert keep.model.layers[1].mlp.experts.gate_up_proj.dtype == FP8_DTYPE
    ref_bf16 = load_pretrained(bf16)
    with torch.no_grad():
        a, b, r = deq(x).logits, keep(x).logits, ref_bf16(x).logits
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)  # dequantise-on-the-fly == dequantise-at-load
        # random-init weights: ~2.6% error per FP8 matmul compounds (and flips near-tied routing choices)
        assert ((a - r).norm() / r.norm()).item() < 0.25
        # MTP runs through FP8 modules too
        h = keep(x).hidden_states
        mask = torch.ones(2, 1, 24, 24, dtype=torch.bool).tril()
        lk, _ = keep.mtp_forward(h, x, torch.arange(24)[None].expand(2, 24), mask)
        ld, _ = deq.mtp_forward(h, x, torch.arange(24)[None].expand(2, 24), mask)
        torch.testing.assert_close(lk, ld, rtol=1e-5, atol=1e-5)
        set_fp8_mode(keep, "emulate")  # the w8a8 GPU path's numerics
        e = keep(x).logits
        assert 0 < ((e - a).norm() / a.norm()).item() < 0.25
    by = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    names = fp8_modules(keep)
    fp8_bytes = sum(by(keep.get_submodule(n)) for n in names)
    fp32_bytes = sum(by(deq.get_submodule(n)) for n in names)
    assert fp8_bytes < 0.26 * fp32_bytes  # 1 byte + one fp32 scale per (≤)128×128 block, vs 4 bytes
    assert by(keep) < by(deq) - 0.74 * fp32_bytes
    kb = keep.to(torch.bfloat16)  # casting keeps FP8 storage
    assert kb.model.layers[0].self_attn.q_a_proj.weight.dtype == FP8_DTYPE
    assert kb.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16


def test_fp8_in_memory_quantize_model_matches_checkpoint_path(ckpts):
    model, _, fp8 = ckpts
    qm = quantize_model(load_pretrained(ckpts[1]))
    keep = load_pretrained(fp8, fp8="keep")
    sq, sk = qm.state_dict(), keep.state_dict()
    assert sq.keys() == sk.keys()
    for k in sq:
        if sq[k].dtype == FP8_DTYPE:
            assert torch.equal(sq[k].view(torch.uint8), sk[k].view(torch.uint8)), k
        else:
            assert torch.equal(sq[k].float(), sk[k].float()), k


def test_fp8_decision_is_per_tensor(ckpts, tmp_path):
    """A tensor is FP8 iff it has a weight_scale_inv: mixed checkpoints load in both modes."""
    _, bf16, fp8 = ckpts
    from safetensors.torch import save_file
    tensors = read_all(fp8)
    src = read_all(bf16)
    # un-quantise one Linear and one expert's gate_proj (keeping everything else FP8)
    for k in ("model.layers.0.self_attn.q_b_proj.weight", "model.layers.1.mlp.experts.3.gate_proj.weight"):
        tensors[k] = src[k]
        del tensors[k + "_scale_inv"]
    d = tmp_path / "mixed"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text((fp8 / "config.json").read_text())
    deq = load_pretrained(d)
    keep = load_pretrained(d, fp8="keep")
    assert isinstance(keep.model.layers[0].self_attn.q_b_proj, torch.nn.Linear)
    assert isinstance(keep.model.layers[0].self_attn.q_a_proj, FP8Linear)
    assert not isinstance(keep.model.layers[1].mlp.experts, FP8Experts)  # one expert unquantised -> dense
    assert isinstance(keep.model.layers[2].mlp.experts, FP8Experts)
    x = torch.randint(1, 2048, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(keep(x).logits, deq(x).logits, rtol=1e-5, atol=1e-5)
    # a float8 weight without its scale is an error naming the tensor
    del tensors["model.layers.0.self_attn.q_a_proj.weight_scale_inv"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="q_a_proj.weight_scale_inv is missing"):
        load_pretrained(d)
    with pytest.raises(ValueError, match="fp8 must be"):
        load_pretrained(fp8, fp8="bogus")


def test_fp8_quantize_is_idempotent_and_refuses_in_place(ckpts, tmp_path):
    _, bf16, fp8 = ckpts
    rep = quantize_checkpoint(fp8, tmp_path / "again", max_shard_size="250KB")
    assert rep["quantized"] == 0 and rep["passed_through_fp8"] > 50
    a, b = read_all(fp8), read_all(tmp_path / "again")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == FP8_DTYPE else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == FP8_DTYPE else b[k]) for k in a)
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads((fp8 / "config.json").read_text())
    with pytest.raises(CheckpointError, match="must differ"):
        quantize_checkpoint(bf16, bf16)


def test_fp8_info_on_disk_ratio(tmp_path, capsys):
    """GLM-5's proportions (embeddings ≈0.3% of weights) -> FP8 ≤ 0.51× BF16 on disk, as glm5 info reports."""
    cfg = dict(vocab_size=128, hidden_size=256, num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=32,
               num_experts_per_tok=2, moe_intermediate_size=256, intermediate_size=512, q_lora_rank=128,
               kv_lora_rank=128, num_nextn_predict_layers=0, pad_token_id=0, eos_token_id=[0])
    model = GLM5ForCausalLM(preset("glm5-nano", **cfg)).init_weights(0)
    model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "fp8")
    b, f = info(str(tmp_path / "bf16")), info(str(tmp_path / "fp8"))
    assert f["quantization"] == "fp8" and b["quantization"] == "none"
    ratio = f["disk_bytes"] / b["disk_bytes"]
    assert ratio <= 0.51, ratio
    # glm5 info's FP8 estimate for this model matches the real file within the safetensors headers
    assert abs(f["disk_bytes"] - f["bytes_fp8_with_mtp"]) < 0.01 * f["disk_bytes"]
    assert cli_main(["info", str(tmp_path / "fp8")]) in (0, None)
    assert "quantization: fp8" in capsys.readouterr().out
    # the full GLM-5 (preset): FP8 / BF16 ≈ 0.50
    full = info("glm5")
    assert full["bytes_fp8_with_mtp"] / full["bytes_bf16_with_mtp"] <= 0.51


def test_transformers_loads_our_fp8_checkpoint(ckpts):
    """transformers 5.23's FineGrainedFP8 path (dequantize=True, what it does on a CPU) reads our files and
    reproduces our logits. Its dequantiser derives the block size from the scale grid, so it mis-handles
    partial 128-blocks (e.g. GLM-5's kv_a_proj_with_mqa, 576 rows) — the fixture keeps dims aligned."""
    pytest.importorskip("accelerate")  # transformers' quantizers require it
    transformers = pytest.importorskip("transformers")
    from transformers import FineGrainedFP8Config, GlmMoeDsaForCausalLM

    transformers.logging.set_verbosity_error()
    model, _, fp8 = ckpts
    hf = GlmMoeDsaForCausalLM.from_pretrained(fp8, dtype=torch.float32,
                                              quantization_config=FineGrainedFP8Config(dequantize=True))
    hf = hf.float().eval()  # transformers leaves the unquantised (bf16-stored) modules in bf16
    ours = load_pretrained(fp8)
    x = torch.randint(1, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x).logits, hf(x).logits
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("unquantized, name", [(torch.bfloat16, "bfloat16"), (None, "float32")])
def test_fp8_config_dtype_names_the_dtype_the_kept_tensors_are_written_in(tmp_path, unquantized, name):
    """From an fp32 checkpoint, config.json's ``dtype`` (and transformers' older ``torch_dtype``, when the input has
    it) must name what the unquantised tensors are stored as, since dtype="auto" loads read it: bfloat16 by default,
    the input's float32 with ``--unquantized-dtype keep``."""
    src = tmp_path / "fp32"
    make_model(**ALIGNED).save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["dtype"] == "float32"
    (src / "config.json").write_text(json.dumps(dict(cfg, torch_dtype="float32")))
    out = tmp_path / "fp8"
    quantize_checkpoint(src, out, unquantized_dtype=unquantized)
    got = json.loads((out / "config.json").read_text())
    assert got["dtype"] == got["torch_dtype"] == name
    tensors = read_all(out)
    assert tensors["lm_head.weight"].dtype == tensors["model.norm.weight"].dtype == getattr(torch, name)
    assert load_pretrained(out, dtype="auto").lm_head.weight.dtype == getattr(torch, name)


def test_fp8_quantize_that_dies_writing_config_leaves_the_previous_config_whole(ckpts, tmp_path, monkeypatch):
    """config.json is written to a temporary name and renamed: a quantize run killed while writing it over an earlier
    output leaves that output's config.json intact (not a truncated JSON file)."""
    _, bf16, _ = ckpts
    out = tmp_path / "fp8"
    quantize_checkpoint(bf16, out, max_shard_size="250KB")
    old = (out / "config.json").read_bytes()
    real = Path.write_text

    def dies_on_config(self, text, *a, **k):
        if self.name.startswith("config.json"):
            real(self, text[: len(text) // 2])
            raise OSError(28, "No space left on device")
        return real(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", dies_on_config)
    with pytest.raises(OSError, match="No space left"):
        quantize_checkpoint(bf16, out, max_shard_size="250KB")
    monkeypatch.undo()
    assert (out / "config.json").read_bytes() == old
    load_pretrained(out)


def test_fp8_dequantize_model_puts_back_the_dequantised_weights(ckpts):
    """dequantize_model undoes convert_to_fp8: plain Linear / Experts modules whose weights are the FP8 values times
    their block scales, so the model computes what the FP8 model computes in "dequant" mode."""
    from glm5.model.moe import Experts

    x = torch.randint(1, 2048, (1, 16), generator=torch.Generator().manual_seed(2))
    fp8 = load_pretrained(ckpts[2], fp8="keep")
    set_fp8_mode(fp8, "dequant")
    names = fp8_modules(fp8)
    held = {n: {k: v.clone() for k, v in fp8.get_submodule(n).state_dict().items()} for n in names}
    with torch.no_grad():
        want = fp8(x).logits
    deq = dequantize_model(fp8)
    assert not fp8_modules(deq)
    for n, sd in held.items():
        mod = deq.get_submodule(n)
        if isinstance(mod, Experts):
            I, rb = mod.intermediate, -(-mod.intermediate // BLOCK)  # gate rows, then up rows; scales likewise
            q, s = sd["gate_up_proj"], sd["gate_up_proj_scale_inv"]
            gu = torch.cat([dequantize_block(q[:, :I], s[:, :rb]), dequantize_block(q[:, I:], s[:, rb:])], dim=1)
            assert torch.equal(mod.gate_up_proj, gu), n
            assert torch.equal(mod.down_proj, dequantize_block(sd["down_proj"], sd["down_proj_scale_inv"])), n
        else:
            assert type(mod) is torch.nn.Linear, n
            assert torch.equal(mod.weight, dequantize_block(sd["weight"], sd["weight_scale_inv"])), n
    with torch.no_grad():
        torch.testing.assert_close(deq(x).logits, want, rtol=1e-5, atol=1e-5)


def test_fp8_quantize_rule_sees_each_tensors_shape(ckpts, tmp_path):
    """quantize_checkpoint's ``rule(file_key, shape)`` is asked with the tensor's real shape, so a rule may decide by
    size (here: only matrices with at least 128 rows become FP8)."""
    _, bf16, _ = ckpts
    seen = {}

    def rule(key, shape):
        seen[key] = shape
        return is_fp8_quantizable(key, shape) and shape[0] >= BLOCK

    quantize_checkpoint(bf16, tmp_path / "o", rule=rule)
    src, out = read_all(bf16), read_all(tmp_path / "o")
    assert seen == {k: tuple(t.shape) for k, t in src.items()}
    fp8 = {k for k, t in out.items() if t.dtype == FP8_DTYPE}
    assert fp8 == {k for k, t in src.items() if is_fp8_quantizable(k, tuple(t.shape)) and t.shape[0] >= BLOCK}
    assert fp8 and fp8 != {k for k, t in src.items() if is_fp8_quantizable(k, tuple(t.shape))}
