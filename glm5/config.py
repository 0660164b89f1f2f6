"""GLM5Config: every field of GLM-5's HF ``config.json``, validated, plus named presets.

The field names are exactly the checkpoint's (``glm_moe_dsa``), so a ``config.json`` from
``zai-org/GLM-5`` loads unchanged and writes back with unknown keys preserved. Derived values
(``qk_head_dim``, per-layer MLP kind, per-layer indexer kind) are properties, never stored twice.

One knob derives the rest for the small presets: ``preset("glm5-tiny")`` etc. keep every part of the
architecture (MLA, DSA indexer, dense-then-MoE layers, shared expert, MTP) at CPU-friendly sizes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GLM5Config", "ConfigError", "preset", "PRESETS", "default_cache_dir"]


def default_cache_dir() -> str:
    """Where glm5 keeps what it can rebuild (tokenised data, trained tokenizers, CPU layout decisions): ``$GLM5_CACHE``,
    else ``~/.cache/glm5``."""
    return os.environ.get("GLM5_CACHE", str(Path.home() / ".cache" / "glm5"))


_HF_ROPE_THETA = 10000.0  # transformers' rope_theta when a config.json gives none


class ConfigError(ValueError):
    """A config value is invalid; the message names the field."""


@dataclass
class GLM5Config:
    # --- sizes -------------------------------------------------------------------------------
    vocab_size: int = 154880
    hidden_size: int = 6144
    num_hidden_layers: int = 78
    num_attention_heads: int = 64
    num_key_value_heads: int = 64
    intermediate_size: int = 12288
    # --- MLA -------------------------------------------------------------------------------------
    q_lora_rank: int = 2048
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 192
    qk_rope_head_dim: int = 64
    v_head_dim: int = 256
    head_dim: int = 64  # ignored by the math (HF overwrites it with qk_rope_head_dim); kept for round trip
    attention_bias: bool = False
    attention_dropout: float = 0.0
    rope_parameters: dict = field(default_factory=lambda: {"rope_theta": 1000000, "rope_type": "default"})
    rope_interleave: bool = True
    indexer_rope_interleave: bool = True
    max_position_embeddings: int = 202752
    # --- DSA lightning indexer -------------------------------------------------------------------
    index_n_heads: int = 32
    index_head_dim: int = 128
    index_topk: int = 2048
    indexer_types: list | None = None  # None -> every layer "full" (GLM-5); GLM-5.2 uses "shared" layers
    # --- MoE -------------------------------------------------------------------------------------
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # --- MTP -------------------------------------------------------------------------------------
    num_nextn_predict_layers: int = 1
    # --- misc ------------------------------------------------------------------------------------
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 154820
    bos_token_id: int | None = None
    eos_token_id: Any = field(default_factory=lambda: [154820, 154827, 154829])
    use_cache: bool = True
    ep_size: int = 1
    pretraining_tp: int = 1
    dtype: str = "bfloat16"
    architectures: list = field(default_factory=lambda: ["GlmMoeDsaForCausalLM"])
    model_type: str = "glm_moe_dsa"
    # Keys we do not model (e.g. transformers_version, quantization_config) survive a round trip.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters.get("rope_theta", _HF_ROPE_THETA))

    @property
    def mlp_layer_types(self) -> list[str]:
        """"dense" or "sparse" (MoE) per main layer, as transformers derives it (moe_layer_freq is not read)."""
        given = self.extra.get("mlp_layer_types")
        if given is not None:
            return list(given)
        n_dense = min(self.first_k_dense_replace, self.num_hidden_layers)
        return ["dense"] * n_dense + ["sparse"] * (self.num_hidden_layers - n_dense)

    @property
    def layer_indexer_types(self) -> list[str]:
        """"full" (own indexer) or "shared" (reuse the previous full layer's top-k) per main layer.

        Explicit ``indexer_types`` win; else GLM-5.2's IndexShare keys (``index_topk_pattern`` or
        ``index_topk_freq``/``index_skip_topk_offset``) as transformers 5.23 reads them; GLM-5 has none of
        them, so every layer is "full"."""
        if self.indexer_types is not None:
            return list(self.indexer_types)
        pattern = self.extra.get("index_topk_pattern")
        if pattern is not None:
            return [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
        freq = max(int(self.extra.get("index_topk_freq", 1) or 1), 1)
        offset = int(self.extra.get("index_skip_topk_offset", 2))
        return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(self.num_hidden_layers)]

    @property
    def mtp_layer_is_moe(self) -> bool:
        # The MTP block is a full decoder layer at index num_hidden_layers; it is MoE whenever the
        # model has MoE layers (GLM-5: yes).
        return self.first_k_dense_replace < self.num_hidden_layers

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return [int(e)] if isinstance(e, int) else [int(x) for x in e]

    # ------------------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str):
            if not cond:
                raise ConfigError(f"{name}: {msg} (got {getattr(self, name, None)!r})")

        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
            "index_n_heads", "index_head_dim", "index_topk", "moe_intermediate_size", "n_routed_experts",
            "num_experts_per_tok", "n_group", "topk_group", "moe_layer_freq",
        ]
        for name in positive:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "must be a positive integer")
        for name in ["q_lora_rank"]:
            v = getattr(self, name)
            # GLM-5 always has a q low-rank path; we do not model the q_lora_rank=None variant.
            need(isinstance(v, int) and v > 0, name, "must be a positive integer")
        for name in ["first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"]:
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 0, name, "must be a non-negative integer")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "RoPE needs an even number of dims")
        need(self.index_head_dim > self.qk_rope_head_dim, "index_head_dim",
             f"must exceed qk_rope_head_dim={self.qk_rope_head_dim} (indexer = [rope | nope])")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"cannot exceed n_routed_experts={self.n_routed_experts}")
        need(self.n_routed_experts % self.n_group == 0, "n_group", "must divide n_routed_experts")
        need(self.topk_group <= self.n_group, "topk_group", f"cannot exceed n_group={self.n_group}")
        need(self.scoring_func == "sigmoid", "scoring_func", "only 'sigmoid' (GLM-5) is supported")
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' (SwiGLU) is supported")
        for name in ["rms_norm_eps", "routed_scaling_factor", "attention_dropout", "initializer_range"]:
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool), name, "must be a number")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0")
        need(not self.attention_bias, "attention_bias", "GLM-5 attention has no biases")
        need(not self.tie_word_embeddings, "tie_word_embeddings", "GLM-5 has a separate lm_head; tying is not supported")
        need(isinstance(self.rope_parameters, dict), "rope_parameters", "must be an object")
        try:
            theta = self.rope_theta
        except (TypeError, ValueError):
            theta = None
        need(theta is not None and theta > 0, "rope_parameters", "rope_theta must be a number > 0")
        rope_type = self.rope_parameters.get("rope_type", "default")
        need(rope_type == "default", "rope_parameters", "only rope_type 'default' (GLM-5, no YaRN) is supported")
        # The pre-rope_parameters key: transformers turns it into rope_parameters, so a YaRN entry there must
        # not be ignored silently.
        scaling = self.extra.get("rope_scaling")
        if isinstance(scaling, dict) and (scaling.get("rope_type") or scaling.get("type") or "default") != "default":
            raise ConfigError(f"rope_scaling: only plain RoPE (GLM-5, no YaRN) is supported (got {scaling!r})")
        mlp_types = self.extra.get("mlp_layer_types")
        if mlp_types is not None:
            ok = isinstance(mlp_types, list) and len(mlp_types) == self.num_hidden_layers and all(
                t in ("dense", "sparse") for t in mlp_types)
            if not ok:
                raise ConfigError(f"mlp_layer_types: needs one 'dense' or 'sparse' per layer ({self.num_hidden_layers})"
                                  f" (got {mlp_types!r})")
        if self.indexer_types is not None:
            need(len(self.indexer_types) == self.num_hidden_layers, "indexer_types",
                 f"needs one entry per layer ({self.num_hidden_layers})")
            need(all(t in ("full", "shared") for t in self.indexer_types), "indexer_types",
                 "entries must be 'full' or 'shared'")
        types = self.layer_indexer_types
        need(types[0] == "full", "indexer_types", "layer 0 must have a full indexer")
        for name in ["pad_token_id", "bos_token_id"]:
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < self.vocab_size), name,
                 f"must be a token id in [0, {self.vocab_size}) or null")
        eos = self.eos_token_id
        ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
        need(isinstance(ids, list) and all(isinstance(e, int) and not isinstance(e, bool) for e in ids),
             "eos_token_id", "must be a token id, a list of token ids or null")
        for e in ids:
            if not 0 <= e < self.vocab_size:
                raise ConfigError(f"eos_token_id: id {e} outside [0, {self.vocab_size})")

    # ------------------------------------------------------------------------------ HF json I/O
    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if f.name == "indexer_types" and v is None:
                continue
            if f.name in ("bos_token_id",) and v is None:
                continue
            out[f.name] = copy.deepcopy(v)
        out["qk_head_dim"] = self.qk_head_dim
        out.update(copy.deepcopy(self.extra))
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, d: dict) -> "GLM5Config":
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if "model_type" in d and d["model_type"] not in ("glm_moe_dsa",):
            raise ConfigError(f"model_type: expected 'glm_moe_dsa', got {d['model_type']!r}")
        # Older copies say torch_dtype; older rope layout used a top-level rope_theta.
        if "torch_dtype" in d and "dtype" not in d:
            d["dtype"] = d.pop("torch_dtype")
        if d.get("rope_parameters") is None:
            # absent or null: transformers' default (10000, not GLM-5's 1e6), or the top-level rope_theta of
            # older configs, so both read the same file the same way
            d["rope_parameters"] = {"rope_theta": d.pop("rope_theta", _HF_ROPE_THETA), "rope_type": "default"}
        d.pop("qk_head_dim", None)  # derived
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / "config.json.tmp"
        tmp.write_text(self.to_json_string())
        os.replace(tmp, path / "config.json")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "GLM5Config":
        """Load from a directory holding config.json, a config.json file, or a preset name."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            if str(path) in PRESETS:
                return preset(str(path))
            raise FileNotFoundError(f"no config.json at {p} and {str(path)!r} is not a preset ({', '.join(PRESETS)})")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: invalid JSON: {e}") from e
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None  # name the file: a directory may hold several configs

    def replace(self, **changes) -> "GLM5Config":
        d = self.to_dict()
        d.update(changes)
        return GLM5Config.from_dict(d)


# ---------------------------------------------------------------------------------------- presets
def _small(hidden: int, layers: int, heads: int, experts: int, top_k: int, vocab: int, *, dense_layers: int = 1,
           index_topk: int, max_pos: int = 4096) -> dict:
    """Derive a small GLM-5-shaped config from a handful of knobs, keeping GLM-5's ratios where sensible:
    q_lora = hidden/3 (2048/6144), kv_lora = hidden/8 (GLM-5: 1/12; wider here so tiny latents are not a bottleneck), rope dim = 1/4 of the q/k head,
    v head = q/k head (256 = 256), dense MLP = 2×hidden, expert = hidden/3, indexer head = 2×rope dim."""
    qk_head = max(16, hidden // heads)
    rope = qk_head // 4
    return dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=2 * hidden, q_lora_rank=hidden // 3 // 8 * 8 or 8,
        kv_lora_rank=max(32, hidden // 8 // 8 * 8), qk_nope_head_dim=qk_head - rope, qk_rope_head_dim=rope,
        v_head_dim=qk_head, head_dim=rope, index_n_heads=max(8, heads), index_head_dim=2 * rope,
        index_topk=index_topk, first_k_dense_replace=dense_layers, moe_intermediate_size=max(16, hidden // 3 // 8 * 8),
        n_routed_experts=experts, num_experts_per_tok=top_k, n_shared_experts=1, max_position_embeddings=max_pos,
        pad_token_id=0, eos_token_id=[0], dtype="float32",
    )


PRESETS: dict[str, dict] = {
    # The official GLM-5 config.json (zai-org/GLM-5), exactly.
    "glm5": dict(extra={"transformers_version": "5.0.2.dev0"}),
    # ~2M params: unit tests, smoke runs.
    "glm5-nano": _small(128, 3, 4, 8, 2, 2048, index_topk=16, max_pos=1024),
    # ~20M total: CPU pretraining in minutes.
    "glm5-tiny": _small(256, 8, 4, 32, 4, 8192, index_topk=64, max_pos=2048),
    # ~200M total: the largest that still trains on a CPU box (slowly) / a quick GPU preset.
    "glm5-small": _small(512, 12, 8, 32, 4, 32768, dense_layers=2, index_topk=256, max_pos=8192),
}


def preset(name: str, **overrides) -> GLM5Config:
    """A config by preset name; keyword overrides are applied on top (and validated)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    d = copy.deepcopy(PRESETS[name])
    extra = d.pop("extra", {})
    cfg = GLM5Config(**d, extra=extra)
    return cfg.replace(**overrides) if overrides else cfg
