"""Official-layout checkpoints: round trips, sharding, key names, dtypes, and clear errors on bad files."""

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glm5 import GLM5ForCausalLM, preset
from glm5.checkpoint.safetensors_io import INDEX_NAME, CheckpointError, parse_size, read_header, shard_files


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    m = GLM5ForCausalLM(preset("glm5-nano")).init_weights(0).eval()
    with torch.no_grad():
        for _, moe in m.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    d = tmp_path_factory.mktemp("nano")
    m.save_pretrained(d, max_shard_size="400KB")
    return m, d


def _all_keys(d):
    keys = {}
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                keys[k] = sf.get_tensor(k)
    return keys


def test_round_trip_is_exact(saved):
    m, d = saved
    m2 = GLM5ForCausalLM.from_pretrained(d)
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    x = torch.randint(0, m.config.vocab_size, (1, 30))
    with torch.no_grad():
        assert torch.equal(m(x).logits, m2(x).logits)


def test_official_key_layout(saved):
    m, d = saved
    cfg = m.config
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    keys = _all_keys(d)
    assert set(keys) == set(index["weight_map"])
    n, E = cfg.num_hidden_layers, cfg.n_routed_experts
    for layer in range(cfg.first_k_dense_replace, n + 1):  # MoE layers + the MTP layer
        for e in range(E):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" in keys
        assert keys[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert not any(k.endswith("gate_up_proj") for k in keys)
    for k in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", f"model.layers.{n}.eh_proj.weight",
              f"model.layers.{n}.shared_head.norm.weight", "model.layers.0.self_attn.indexer.k_norm.bias",
              "model.layers.0.mlp.gate_proj.weight"]:
        assert k in keys, k
    I = cfg.moe_intermediate_size
    fused = m.model.layers[n - 1].mlp.experts.gate_up_proj
    assert torch.equal(keys[f"model.layers.{n - 1}.mlp.experts.2.gate_proj.weight"], fused[2, :I])
    assert torch.equal(keys[f"model.layers.{n - 1}.mlp.experts.2.up_proj.weight"], fused[2, I:])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in keys.values())


def test_bf16_save_and_load_keeps_router_bias_fp32(saved, tmp_path):
    m, _ = saved
    m.save_pretrained(tmp_path, dtype=torch.bfloat16)
    keys = _all_keys(tmp_path)
    assert keys["lm_head.weight"].dtype == torch.bfloat16
    assert keys["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    m2 = GLM5ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert m2.lm_head.weight.dtype == torch.bfloat16
    bias = m2.moe_layers()[0][1].gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, m.moe_layers()[0][1].gate.e_score_correction_bias)


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


def _shard_with(d, key):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    return d / index["weight_map"][key]


def test_missing_tensor_is_named(saved, tmp_path):
    _, d = saved
    bad = tmp_path / "bad"
    _copy(d, bad)
    key = "model.layers.1.self_attn.kv_b_proj.weight"
    f = _shard_with(bad, key)
    with safe_open(str(f), "pt") as sf:
        data = {k: sf.get_tensor(k) for k in sf.keys() if k != key}
    save_file(data, str(f))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
        GLM5ForCausalLM.from_pretrained(bad)


def test_misshaped_and_unexpected_tensors_are_named(saved, tmp_path):
    _, d = saved
    bad = tmp_path / "bad"
    _copy(d, bad)
    key = "model.layers.0.self_attn.o_proj.weight"
    f = _shard_with(bad, key)
    with safe_open(str(f), "pt") as sf:
        data = {k: sf.get_tensor(k) for k in sf.keys()}
    data[key] = data[key][:, :-1].contiguous()
    save_file(data, str(f))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight.*shape"):
        GLM5ForCausalLM.from_pretrained(bad)
    bad2 = tmp_path / "bad2"
    _copy(d, bad2)
    f = _shard_with(bad2, key)
    with safe_open(str(f), "pt") as sf:
        data = {k: sf.get_tensor(k) for k in sf.keys()}
    data["model.layers.0.self_attn.bogus.weight"] = torch.zeros(2)
    save_file(data, str(f))
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor.*bogus"):
        GLM5ForCausalLM.from_pretrained(bad2)


def test_truncated_shard_is_reported_with_its_name(saved, tmp_path):
    _, d = saved
    bad = tmp_path / "bad"
    _copy(d, bad)
    f = sorted(bad.glob("model-*.safetensors"))[1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{f.name}.*truncated"):
        GLM5ForCausalLM.from_pretrained(bad)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        GLM5ForCausalLM.from_pretrained(bad)
    # cut inside the JSON header: reported as truncated (what a partial download is), not as a corrupt header
    (n,) = struct.unpack("<Q", data[:8])
    f.write_bytes(data[: 8 + n // 2])
    with pytest.raises(CheckpointError, match=rf"{f.name}: truncated safetensors file \(header says {n} bytes"):
        GLM5ForCausalLM.from_pretrained(bad)


def test_pickle_only_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(preset("glm5-nano").to_json_string())
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        GLM5ForCausalLM.from_pretrained(tmp_path)


def test_single_file_and_resave_removes_stale_shards(saved, tmp_path):
    m, _ = saved
    m.save_pretrained(tmp_path, max_shard_size="300KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    m.save_pretrained(tmp_path)  # fits in one file now
    assert (tmp_path / "model.safetensors").exists()
    # without an index the key -> file map comes from the header: tensors only, not its "__metadata__" entry
    assert shard_files(tmp_path)[1] == {k: "model.safetensors" for k in _all_keys(tmp_path)}
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))
    GLM5ForCausalLM.from_pretrained(tmp_path)


def test_weight_files_get_the_umask_mode_like_any_new_file(saved, tmp_path):
    """safetensors writes 0600 files; exported checkpoints must be readable by whoever reads the other files."""
    import os
    import stat

    m, _ = saved
    old = os.umask(0o022)
    try:
        m.save_pretrained(tmp_path, max_shard_size="300KB")
    finally:
        os.umask(old)
    for f in [*tmp_path.glob("*.safetensors"), tmp_path / "config.json"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(17) == 17
    with pytest.raises(ValueError):
        parse_size("lots")


def test_loading_peaks_near_one_copy(tmp_path):
    """Shard-by-shard loading: peak RSS grows by about one copy of the weights, not two."""
    cfg = preset("glm5-tiny", vocab_size=32768)
    m = GLM5ForCausalLM(cfg).init_weights(0)
    nbytes = sum(p.numel() * p.element_size() for p in m.state_dict().values())
    m.save_pretrained(tmp_path, max_shard_size="20MB")
    del m
    code = (
        "import resource, sys, torch\n"
        "from glm5 import GLM5ForCausalLM\n"
        "import glm5.checkpoint.hf\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "m = GLM5ForCausalLM.from_pretrained(sys.argv[1])\n"
        "r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((r1 - r0) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    grew = int(out.stdout.strip())
    assert grew < 1.5 * nbytes, (grew, nbytes)


def test_shards_carry_the_pt_format_metadata(saved):
    """Every shard's safetensors metadata says {"format": "pt"}, as transformers' save_pretrained writes it:
    transformers 4.x refuses shards without it ("does not contain the valid metadata", see ml-explore/mlx#743,
    meta-pytorch/torchtune#1126)."""
    _, d = saved
    shards = sorted(d.glob("*.safetensors"))
    assert len(shards) > 1
    for f in shards:
        with safe_open(str(f), "pt") as sf:
            assert sf.metadata() == {"format": "pt"}, f.name


@pytest.mark.parametrize("dies_in", ["shard", "index"])
def test_a_save_that_dies_mid_write_leaves_every_final_file_whole(saved, tmp_path, monkeypatch, dies_in):
    """Shards and the index are written under a temporary name and renamed: a save killed while writing the second
    shard or the index (disk full, OOM kill) leaves no half-written file under a name a loader reads, so the
    checkpoint already in the directory still loads."""
    import glm5.checkpoint.safetensors_io as sio

    m, _ = saved
    out = tmp_path / "ckpt"
    m.save_pretrained(out, max_shard_size="400KB")
    old_index = (out / INDEX_NAME).read_bytes()

    def half_then_die(path: Path, data: bytes):
        path.write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    real_save, real_write_text, shards_written = sio.save_file, sio.Path.write_text, []

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        shards_written.append(filename)
        if dies_in == "shard" and len(shards_written) == 2:
            half_then_die(Path(filename), Path(filename).read_bytes())

    def write_text(self, text, *a, **k):
        if dies_in == "index" and self.name.startswith(INDEX_NAME):
            half_then_die(self, text.encode())
        return real_write_text(self, text, *a, **k)

    monkeypatch.setattr(sio, "save_file", save_file)
    monkeypatch.setattr(sio.Path, "write_text", write_text)
    with pytest.raises(OSError, match="No space left"):
        m.save_pretrained(out, max_shard_size="400KB")
    monkeypatch.undo()
    assert (out / INDEX_NAME).read_bytes() == old_index
    for f in out.glob("*.safetensors"):
        read_header(f)  # whole, not truncated
    m2 = GLM5ForCausalLM.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


@pytest.mark.parametrize("intermediate", [40, 128, 200, 256])
def test_expert_scale_keys_map_to_their_block_rows_of_the_fused_scales(intermediate):
    """Per-expert FP8 scales -> the fused experts' scale tensors: gate_proj's ⌈I/128⌉ block rows first, then
    up_proj's (gate and up are quantised as separate matrices); down_proj's scale is the expert's whole slice."""
    from glm5.checkpoint.hf import file_key_to_param

    rb = math.ceil(intermediate / 128)
    p = "model.layers.3.mlp.experts"
    assert file_key_to_param(f"{p}.5.gate_proj.weight_scale_inv", intermediate) == \
        (f"{p}.gate_up_proj_scale_inv", (5, slice(0, rb)))
    assert file_key_to_param(f"{p}.5.up_proj.weight_scale_inv", intermediate) == \
        (f"{p}.gate_up_proj_scale_inv", (5, slice(rb, 2 * rb)))
    assert file_key_to_param(f"{p}.7.down_proj.weight_scale_inv", intermediate) == (f"{p}.down_proj_scale_inv", (7,))
    assert file_key_to_param(f"{p}.5.up_proj.weight", intermediate) == \
        (f"{p}.gate_up_proj", (5, slice(intermediate, 2 * intermediate)))
