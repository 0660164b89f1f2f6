"""Fault injection on official-layout checkpoints (sharded BF16 and GLM-5-FP8): every broken file gives one
CheckpointError naming the file and the tensor, before any weight is allocated, and nothing loads silently
wrong. Also the dtype choices a transformers user passes (names, "auto", ``torch_dtype``)."""

import json
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glm5 import GLM5ForCausalLM, preset
from glm5.checkpoint.hf import load_pretrained
from glm5.checkpoint.quantize import quantize_checkpoint
from glm5.checkpoint.safetensors_io import INDEX_NAME, CheckpointError, read_header
from glm5.cli import main as cli_main

KEY = "model.layers.1.self_attn.q_b_proj.weight"  # FP8 in the FP8 checkpoint
SCALE = KEY + "_scale_inv"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    model = GLM5ForCausalLM(preset("glm5-nano")).init_weights(0).eval()
    root = tmp_path_factory.mktemp("faults")
    model.save_pretrained(root / "bf16", max_shard_size="300KB", dtype=torch.bfloat16)
    quantize_checkpoint(root / "bf16", root / "fp8", max_shard_size="250KB")
    return model, root / "bf16", root / "fp8"


def _clone(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _shard(d, key):
    return d / json.loads((d / INDEX_NAME).read_text())["weight_map"][key]


def _rewrite(f, mutate):
    with safe_open(str(f), "pt") as sf:
        data = {k: sf.get_tensor(k) for k in sf.keys()}
    mutate(data)
    save_file(data, str(f))


def _no_allocation(monkeypatch):
    """Fail the test if the loader gets as far as materialising the model."""
    def boom(self, *a, **k):
        raise AssertionError("the model was allocated before the checkpoint was refused")
    monkeypatch.setattr(torch.nn.Module, "to_empty", boom)


def test_duplicate_tensor_across_shards_is_refused_with_both_files(ckpts, tmp_path, monkeypatch):
    _, bf16, _ = ckpts
    d = _clone(bf16, tmp_path)
    home = _shard(d, KEY)
    other = next(f for f in sorted(d.glob("model-*.safetensors")) if f != home)
    with safe_open(str(home), "pt") as sf:
        value = sf.get_tensor(KEY)
    _rewrite(other, lambda data: data.__setitem__(KEY, value * 2))
    _no_allocation(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"{KEY} is stored twice, in model-\d+-of-\d+\.safetensors and in"):
        load_pretrained(d)
    with pytest.raises(CheckpointError, match="stored twice"):  # quantize refuses it too
        quantize_checkpoint(d, tmp_path / "out")


def test_shard_listed_in_the_index_but_absent_is_named(ckpts, tmp_path):
    """An interrupted download can leave the index and some shards: the missing file is named, not a bare
    FileNotFoundError from deep inside a header read."""
    _, bf16, fp8 = ckpts
    for src in (bf16, fp8):
        d = _clone(src, tmp_path)
        gone = _shard(d, KEY)
        gone.unlink()
        with pytest.raises(CheckpointError, match=rf"{gone.name}: listed in {INDEX_NAME} but missing"):
            load_pretrained(d)
        with pytest.raises(CheckpointError, match=rf"{gone.name}: listed in {INDEX_NAME} but missing"):
            quantize_checkpoint(d, tmp_path / "out")


def test_integer_tensor_is_refused_not_cast(ckpts, tmp_path, monkeypatch):
    _, bf16, _ = ckpts
    d = _clone(bf16, tmp_path)
    _rewrite(_shard(d, KEY), lambda data: data.__setitem__(KEY, data[KEY].to(torch.int32)))
    _no_allocation(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"{KEY} in model-.*: dtype int32, expected a floating-point"):
        load_pretrained(d)
    with pytest.raises(CheckpointError, match="int32"):
        quantize_checkpoint(d, tmp_path / "out")


def test_fp16_and_fp64_tensors_load_by_value(ckpts, tmp_path):
    model, bf16, _ = ckpts
    d = _clone(bf16, tmp_path)
    _rewrite(_shard(d, KEY), lambda data: data.__setitem__(KEY, data[KEY].to(torch.float64)))
    got = load_pretrained(d).model.layers[1].self_attn.q_b_proj.weight
    assert torch.equal(got, model.model.layers[1].self_attn.q_b_proj.weight.bfloat16().float())


def test_shape_mismatch_is_refused_before_allocation(ckpts, tmp_path, monkeypatch):
    _, bf16, _ = ckpts
    d = _clone(bf16, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["vocab_size"]  # falls back to GLM-5's 154,880: the full-size embedding must not be allocated
    (d / "config.json").write_text(json.dumps(cfg))
    _no_allocation(monkeypatch)
    with pytest.raises(CheckpointError, match=r"shape \(2048, 128\), the config expects \(154880, 128\)"):
        load_pretrained(d)


def test_fp8_scale_missing_from_the_shard_though_the_index_lists_it(ckpts, tmp_path, monkeypatch):
    _, _, fp8 = ckpts
    d = _clone(fp8, tmp_path)
    _rewrite(_shard(d, SCALE), lambda data: data.pop(SCALE))  # the index still names it (was a raw SafetensorError)
    _no_allocation(monkeypatch)
    for mode in ("dequantize", "keep"):
        with pytest.raises(CheckpointError, match=rf"{KEY} in model-.* is float8 but {SCALE} is missing"):
            load_pretrained(d, fp8=mode)


def test_fp8_scale_of_the_wrong_grid_is_named(ckpts, tmp_path):
    _, _, fp8 = ckpts
    d = _clone(fp8, tmp_path)
    _rewrite(_shard(d, SCALE), lambda data: data.__setitem__(SCALE, torch.ones(3, 3)))
    with pytest.raises(CheckpointError, match=rf"{SCALE} in model-.*: shape \(3, 3\), expected \(1, 1\)"):
        load_pretrained(d)


def test_scale_next_to_an_unquantised_weight_is_refused(ckpts, tmp_path):
    """A bf16 weight with a weight_scale_inv: dequantize mode ignored the scale, keep mode applied it to
    unscaled values; both were silent."""
    _, _, fp8 = ckpts
    d = _clone(fp8, tmp_path)
    _rewrite(_shard(d, KEY), lambda data: data.__setitem__(KEY, data[KEY].float().bfloat16()))
    for mode in ("dequantize", "keep"):
        with pytest.raises(CheckpointError, match=rf"{SCALE} in .*{KEY} is stored as bfloat16, not float8"):
            load_pretrained(d, fp8=mode)


def test_e5m2_weights_dequantise_but_are_refused_by_keep(ckpts, tmp_path):
    """fp8='keep' holds e4m3 weights: an e5m2 one used to be re-cast without its scale (the layer came out
    near zero)."""
    _, _, fp8 = ckpts
    d = _clone(fp8, tmp_path)
    _rewrite(_shard(d, KEY), lambda data: data.__setitem__(KEY, data[KEY].float().to(torch.float8_e5m2)))
    ref = load_pretrained(fp8).model.layers[1].self_attn.q_b_proj.weight
    got = load_pretrained(d).model.layers[1].self_attn.q_b_proj.weight
    assert ((got - ref).abs() <= 0.125 * ref.abs() + 1e-6).all()  # e5m2 keeps 2 mantissa bits: within 1/8
    with pytest.raises(CheckpointError, match=r"float8_e5m2; fp8='keep' holds float8_e4m3fn weights only"):
        load_pretrained(d, fp8="keep")


@pytest.mark.parametrize("qcfg, match", [
    ({"quant_method": "awq", "bits": 4}, r"quant_method 'awq' is not supported"),
    ({"quant_method": "fp8", "weight_block_size": [64, 64]}, r"weight_block_size \[64, 64\] is not supported"),
    ("fp8", r"quantization_config must be an object"),
])
def test_unsupported_quantization_config_is_named(ckpts, tmp_path, qcfg, match):
    _, _, fp8 = ckpts
    d = _clone(fp8, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(d)


def test_mtp_weights_are_skipped_when_the_config_disables_mtp(ckpts, tmp_path):
    """num_nextn_predict_layers: 0 with layer-N tensors on disk loads the main model, as transformers does."""
    model, bf16, _ = ckpts
    d = _clone(bf16, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 0
    (d / "config.json").write_text(json.dumps(cfg))
    got = load_pretrained(d)
    assert got.config.num_nextn_predict_layers == 0 and len(got.model.layers) == cfg["num_hidden_layers"]
    x = torch.randint(0, cfg["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    ref = load_pretrained(bf16)
    with torch.no_grad():
        assert torch.equal(got(x).logits, ref(x).logits)


def _patch_header(f, mutate):
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    mutate(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    f.write_bytes(raw[:8] + new.ljust(n) + raw[8 + n:])


@pytest.mark.parametrize("mutate, match", [
    (lambda h: h[KEY].__setitem__("dtype", "F8_E8M0"), rf"tensor {KEY} has dtype F8_E8M0, which glm5 cannot load"),
    (lambda h: h[KEY].pop("data_offsets"), rf"corrupt safetensors header entry for {KEY}"),
    (lambda h: h[KEY].__setitem__("shape", [1, 1]), rf"{KEY} \[1, 1\] BF16 needs 2 bytes"),
    (lambda h: h[KEY].__setitem__("data_offsets", [0, h[KEY]["data_offsets"][1] - h[KEY]["data_offsets"][0]]),
     "invalid offset"),  # overlapping ranges: safetensors' own check, reported with the file name
])
def test_corrupt_headers_are_named(ckpts, tmp_path, mutate, match):
    _, bf16, _ = ckpts
    d = _clone(bf16, tmp_path)
    f = _shard(d, KEY)
    _patch_header(f, mutate)
    with pytest.raises(CheckpointError, match=match) as e:
        load_pretrained(d)
    assert f.name in str(e.value)


def test_git_lfs_pointer_and_non_object_header(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 5000000000\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer file, not the weights"):
        read_header(f)
    f.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        read_header(f)


def test_index_whose_weight_map_is_not_a_mapping(ckpts, tmp_path):
    _, bf16, _ = ckpts
    d = _clone(bf16, tmp_path)
    (d / INDEX_NAME).write_text('{"weight_map": ["model-00001-of-00007.safetensors"]}')
    with pytest.raises(CheckpointError, match="weight_map must map tensor names to file names"):
        load_pretrained(d)


def test_dtype_names_auto_and_torch_dtype(ckpts):
    _, bf16, _ = ckpts
    assert load_pretrained(bf16, dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    assert load_pretrained(bf16, dtype="auto").lm_head.weight.dtype == torch.bfloat16  # config.json: bfloat16
    m = GLM5ForCausalLM.from_pretrained(bf16, torch_dtype=torch.float16)
    assert m.lm_head.weight.dtype == torch.float16
    assert m.moe_layers()[0][1].gate.e_score_correction_bias.dtype == torch.float32
    for bad in ("int8", torch.int8, "bf17"):
        with pytest.raises(ValueError, match="dtype: expected float32, bfloat16, float16 or 'auto'"):
            load_pretrained(bf16, dtype=bad)


def test_cli_reports_a_corrupt_shard_in_one_line(ckpts, tmp_path, capsys):
    _, bf16, _ = ckpts
    d = _clone(bf16, tmp_path)
    _patch_header(_shard(d, KEY), lambda h: h[KEY].__setitem__("dtype", "F8_E8M0"))
    assert cli_main(["quantize", "--in", str(d), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glm5 quantize: error: ") and "F8_E8M0" in err and "\n" not in err


def test_info_reads_headers_only_and_reports_what_is_stored(ckpts, tmp_path, monkeypatch):
    """glm5 info on an FP8 dir reads no tensor data; a dir whose weights lack the MTP layer (transformers saves
    none) is reported without MTP, as it loads; a null quantization_config is 'none', not an AttributeError."""
    import glm5.checkpoint.safetensors_io as sio
    from glm5.info import info

    _, bf16, fp8 = ckpts
    real = sio.safe_open

    class HeadersOnly:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            raise AssertionError(f"glm5 info read tensor {key}")

    import glm5.checkpoint.hf as hf

    for module in (sio, hf):
        monkeypatch.setattr(module, "safe_open", HeadersOnly)
    st = info(str(fp8))
    assert st["quantization"] == "fp8" and st["params_mtp"] > 0
    monkeypatch.undo()

    d = tmp_path / "no_mtp"
    GLM5ForCausalLM(preset("glm5-nano", num_nextn_predict_layers=0)).init_weights(0).save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(num_nextn_predict_layers=1, quantization_config=None)
    (d / "config.json").write_text(json.dumps(cfg))
    st = info(str(d))
    assert st["params_mtp"] == 0 and st["quantization"] == "none"
    assert load_pretrained(d).config.num_nextn_predict_layers == 0


def test_generation_config_is_read_and_checked(ckpts, tmp_path):
    """The loaded model carries generation_config.json (eos ids as a list), as a transformers model does;
    malformed eos ids are named instead of ignored."""
    model, bf16, _ = ckpts
    assert load_pretrained(bf16).generation_config["eos_token_id"] == model.config.eos_token_ids
    d = _clone(bf16, tmp_path)
    gen = {"eos_token_id": 0, "pad_token_id": 0, "temperature": 1.0, "top_p": 0.95}
    (d / "generation_config.json").write_text(json.dumps(gen))
    assert load_pretrained(d).generation_config == dict(gen, eos_token_id=[0])
    for bad in ([0, "<|user|>"], [10**6], True):
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": bad}))
        with pytest.raises(CheckpointError, match=r"generation_config\.json: eos_token_id must be token ids"):
            load_pretrained(d)
    (d / "generation_config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"generation_config\.json: invalid JSON"):
        load_pretrained(d)
    (d / "generation_config.json").unlink()
    assert load_pretrained(d).generation_config == {}


def test_meta_device_is_refused_not_loaded_empty(ckpts):
    _, bf16, _ = ckpts
    with pytest.raises(ValueError, match="device='meta' would load no weights"):
        load_pretrained(bf16, device="meta")
