import json

import pytest

from glm5.config import PRESETS, ConfigError, GLM5Config, preset

OFFICIAL = {  # zai-org/GLM-5 config.json (reference architecture.md §1)
    "architectures": ["GlmMoeDsaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "dtype": "bfloat16",
    "eos_token_id": [154820, 154827, 154829], "ep_size": 1, "first_k_dense_replace": 3, "head_dim": 64,
    "hidden_act": "silu", "hidden_size": 6144, "index_head_dim": 128, "index_n_heads": 32, "index_topk": 2048,
    "indexer_rope_interleave": True, "initializer_range": 0.02, "intermediate_size": 12288, "kv_lora_rank": 512,
    "max_position_embeddings": 202752, "model_type": "glm_moe_dsa", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 64, "num_experts_per_tok": 8, "num_hidden_layers": 78, "num_key_value_heads": 64,
    "num_nextn_predict_layers": 1, "pad_token_id": 154820, "pretraining_tp": 1, "q_lora_rank": 2048,
    "qk_head_dim": 256, "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-05,
    "rope_interleave": True, "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"},
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False, "topk_group": 1,
    "topk_method": "noaux_tc", "transformers_version": "5.0.2.dev0", "use_cache": True, "v_head_dim": 256,
    "vocab_size": 154880,
}


def test_glm5_preset_is_the_official_config():
    assert preset("glm5").to_dict() == dict(sorted(OFFICIAL.items()))


def test_official_json_round_trip_keeps_unknown_keys(tmp_path):
    d = dict(OFFICIAL, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}, foo_bar=7)
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = GLM5Config.from_pretrained(tmp_path)
    assert cfg.extra["foo_bar"] == 7 and cfg.qk_head_dim == 256
    cfg.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == d


def test_transformers_config_dict_loads():
    transformers = pytest.importorskip("transformers")
    hf = transformers.GlmMoeDsaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, pad_token_id=0, eos_token_id=1)
    cfg = GLM5Config.from_dict(hf.to_dict())
    assert cfg.hidden_size == 64 and cfg.layer_indexer_types == ["full", "full"]
    assert cfg.mlp_layer_types == ["dense", "dense"]


def test_old_style_keys():
    d = dict(OFFICIAL)
    d.pop("rope_parameters")
    d.pop("dtype")
    d["rope_theta"] = 500000
    d["torch_dtype"] = "bfloat16"
    cfg = GLM5Config.from_dict(d)
    assert cfg.rope_theta == 500000 and cfg.dtype == "bfloat16"


@pytest.mark.parametrize("change,field", [
    (dict(num_experts_per_tok=300), "num_experts_per_tok"),
    (dict(qk_rope_head_dim=63), "qk_rope_head_dim"),
    (dict(kv_lora_rank=-1), "kv_lora_rank"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(first_k_dense_replace=-2), "first_k_dense_replace"),
    (dict(n_group=3), "n_group"),
    (dict(topk_group=2), "topk_group"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(pad_token_id=10**7), "pad_token_id"),
    (dict(rope_parameters={"rope_theta": 1e6, "rope_type": "yarn"}), "rope_parameters"),
    (dict(indexer_types=["shared"] * 78), "indexer_types"),
    (dict(hidden_size="6144"), "hidden_size"),
])
def test_validation_names_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        preset("glm5", **change)


def test_bad_json_and_wrong_model_type(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        GLM5Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type"):
        GLM5Config.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("glm6")


def test_index_share_schedule_matches_glm52():
    cfg = preset("glm5", index_topk_freq=4, index_skip_topk_offset=3)
    full = [i for i, t in enumerate(cfg.layer_indexer_types) if t == "full"]
    assert full[:6] == [0, 1, 2, 6, 10, 14] and len(full) == 21  # + the MTP layer's own = 22 indexers


def test_small_presets_keep_every_part_of_the_architecture():
    for name in PRESETS:
        cfg = preset(name)
        kinds = cfg.mlp_layer_types
        assert "dense" in kinds and "sparse" in kinds, name
        assert cfg.num_nextn_predict_layers == 1 and cfg.n_shared_experts >= 1
        assert cfg.q_lora_rank > 0 and cfg.kv_lora_rank > 0 and cfg.index_topk > 0


def test_rope_defaults_read_like_transformers():
    """A config.json without rope_parameters (or with null) means transformers' 10000, not GLM-5's 1e6."""
    transformers = pytest.importorskip("transformers")
    for change in ({"rope_parameters": None}, {"rope_parameters": "absent"}, {"rope_parameters": {"rope_type": "default"}}):
        d = dict(OFFICIAL, **change)
        if d["rope_parameters"] == "absent":
            del d["rope_parameters"]
        hf = transformers.GlmMoeDsaConfig.from_dict(d)
        assert GLM5Config.from_dict(d).rope_theta == hf.rope_parameters["rope_theta"] == 10000.0, change
    legacy = {k: v for k, v in OFFICIAL.items() if k != "rope_parameters"}
    assert GLM5Config.from_dict(dict(legacy, rope_theta=5e5, rope_scaling=None)).rope_theta == 5e5


@pytest.mark.parametrize("change,match", [
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling: only plain RoPE"),  # was ignored silently
    (dict(rope_parameters=[1e6]), "rope_parameters: must be an object"),
    (dict(rope_parameters={"rope_theta": "fast"}), "rope_theta must be a number"),
    (dict(rms_norm_eps="1e-5"), "rms_norm_eps: must be a number"),  # was a TypeError from a comparison
    (dict(routed_scaling_factor=None), "routed_scaling_factor: must be a number"),
    (dict(eos_token_id=["<|user|>"]), "eos_token_id: must be a token id"),  # was int()'s message, no field
    (dict(pad_token_id=True), "pad_token_id"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),  # the lm_head would have loaded untied
    (dict(mlp_layer_types=["dense"]), "mlp_layer_types: needs one"),  # was an IndexError building the model
])
def test_malformed_fields_are_named(change, match):
    with pytest.raises(ConfigError, match=match):
        GLM5Config.from_dict(dict(OFFICIAL, **change))


def test_config_file_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config\.json: a config must be a JSON object, got list"):
        GLM5Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(OFFICIAL, rms_norm_eps="x")))
    with pytest.raises(ConfigError, match=r"config\.json: rms_norm_eps"):
        GLM5Config.from_pretrained(tmp_path)
