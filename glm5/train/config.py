"""``TrainConfig``: every knob of a training run, in one flat dataclass.

Load it from flags, from a ``.toml`` / ``.json`` file (``TrainConfig.from_file``; flags override the
file), or build it in Python. A few values are derived when left unset (``resolve``):

* ``grad_accum`` from ``batch_tokens`` (global tokens per optimiser step) =
  ``batch_size × seq_len × world_size × grad_accum``;
* ``warmup_steps`` = 5% of ``max_steps`` (at most 200, at least 1); with a time budget (``max_minutes``) the
  horizon is only known after a few timed steps, so the warm-up is then 10 steps;
* ``doc_mask`` is always on for SFT (each conversation attends only to itself);
* ``lr`` defaults per stage: 2e-3 for training, 1e-3 for the indexer warm-up (DeepSeek-V3.2's value).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from glm5.config import default_cache_dir

__all__ = ["TrainConfig", "DSA_STAGES", "default_cache_dir"]

DSA_STAGES = ("dense", "indexer-warmup", "sparse")
MODES = ("pretrain", "sft")


@dataclass
class TrainConfig:
    # ---- what to train -------------------------------------------------------------------------
    mode: str = "pretrain"  # "pretrain" (packed text) | "sft" (chat conversations, assistant-only loss)
    preset: str = "glm5-tiny"  # model preset when neither init_from nor model_config is given
    model_config: str | None = None  # a config.json (or a directory holding one)
    model_overrides: dict = field(default_factory=dict)  # GLM5Config fields to change, e.g. {"num_hidden_layers": 4}
    init_from: str | None = None  # HF-layout checkpoint directory to start from (weights, config, tokenizer)
    # ---- data --------------------------------------------------------------------------------------
    data: list = field(default_factory=lambda: ["default"])  # "default", files (.txt/.jsonl/.parquet) or dirs
    tokenizer: str | None = None  # tokenizer directory; default: init_from's, else a BPE trained on the data
    text_field: str = "text"  # jsonl / parquet field holding the document text
    cache_dir: str = field(default_factory=default_cache_dir)  # tokenised data and trained tokenizers
    val_fraction: float = 0.02
    doc_mask: bool = False  # pretraining: attention (and MTP targets) stay within EOS-separated documents
    sft_examples: int = 2000  # size of the generated default SFT set
    # ---- output ------------------------------------------------------------------------------------
    out: str = "runs/glm5"
    # ---- batch -------------------------------------------------------------------------------------
    seq_len: int = 256
    batch_size: int = 8  # rows per process per micro-batch
    grad_accum: int | None = None  # micro-batches per step (derived from batch_tokens when None)
    batch_tokens: int | None = None  # global tokens per optimiser step
    # ---- horizon -----------------------------------------------------------------------------------
    max_steps: int = 1000
    max_minutes: float | None = None  # time budget: after warm-up the LR schedule follows elapsed time / budget
    # and the run ends at the budget (or max_steps, whichever comes first)
    # ---- optimiser ---------------------------------------------------------------------------------
    optimizer: str = "muon"  # "muon" (Muon on hidden matrices + AdamW on the rest) | "adamw"
    muon_split: bool = True  # GLM-5's Muon Split: orthogonalise MLA up-projections per head
    muon_impl: str = "auto"  # "auto" | "glm5" (ours) | "torch" (torch.optim.Muon for plain 2-D matrices)
    lr: float | None = None
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # "cosine" | "wsd" | "constant" (all after a linear warm-up)
    warmup_steps: int | None = None
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying
    weight_decay: float = 0.1
    adam_betas: tuple = (0.9, 0.95)
    muon_momentum: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    # ---- objective ---------------------------------------------------------------------------------
    mtp_weight: float = 0.3
    mtp_depth: int = 1  # MTP steps sharing the one MTP layer (GLM-5 trains 3)
    mtp_target: str = "data"  # "data": the corpus's next tokens | "self": distil the main model's distribution
    mtp_only: bool = False  # train only the MTP block; the main model (and its outputs) stays exactly as loaded
    bias_update_rate: float = 1e-2  # aux-loss-free balancing γ (0 disables). DeepSeek-V3 used 1e-3 over ~10^5
    # steps; runs of a few hundred steps need a faster rate to undo early routing collapse (see benchmarks/train.md)
    seq_balance_alpha: float = 0.0  # sequence-level balance loss weight (DeepSeek-V3: 1e-4); 0 = off
    dsa: str = "dense"  # "dense" | "indexer-warmup" | "sparse"
    indexer_loss_weight: float = 1.0
    # ---- runtime -----------------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    compile: bool = False  # torch.compile each decoder layer
    activation_checkpointing: bool = False
    threads: int | None = None  # torch CPU threads (default: cores / local processes)
    # ---- cadence -----------------------------------------------------------------------------------
    log_every: int = 1
    eval_every: int = 100
    eval_batches: int = 16
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest complete checkpoint in out/checkpoints
    export: bool = True  # write out/hf (HF layout + tokenizer) at the end
    plot: bool = True  # write out/train.png at the end
    progress: bool = True

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        need(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        need(self.dsa in DSA_STAGES, f"dsa must be one of {DSA_STAGES}, got {self.dsa!r}")
        need(self.optimizer in ("muon", "adamw"), f"optimizer must be 'muon' or 'adamw', got {self.optimizer!r}")
        need(self.muon_impl in ("auto", "glm5", "torch"), f"muon_impl must be auto|glm5|torch, got {self.muon_impl!r}")
        need(self.schedule in ("cosine", "wsd", "constant"), f"schedule must be cosine|wsd|constant, got {self.schedule!r}")
        need(self.seq_len > 1 and self.batch_size > 0 and self.max_steps > 0, "seq_len > 1, batch_size > 0, max_steps > 0")
        need(self.mtp_depth >= 0 and self.mtp_weight >= 0, "mtp_depth and mtp_weight must be >= 0")
        need(self.mtp_target in ("data", "self"), f"mtp_target must be 'data' or 'self', got {self.mtp_target!r}")
        need(not self.mtp_only or self.mtp_depth >= 1, "mtp_only needs mtp_depth >= 1")
        need(not self.mtp_only or self.dsa != "indexer-warmup",
             "mtp_only cannot be combined with dsa=indexer-warmup (the warm-up trains only the indexers)")
        need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must be in [0, 1]")
        need(0.0 < self.decay_fraction <= 1.0, "decay_fraction must be in (0, 1]")
        need(self.grad_accum is None or self.grad_accum > 0, "grad_accum must be > 0")

    def resolve(self, world_size: int = 1) -> "TrainConfig":
        """A copy with derived values filled in."""
        c = dataclasses.replace(self)
        c.data = [c.data] if isinstance(c.data, str) else list(c.data)
        c.adam_betas = tuple(c.adam_betas)
        if c.grad_accum is None:
            per_micro = c.batch_size * c.seq_len * world_size
            c.grad_accum = max(1, round(c.batch_tokens / per_micro)) if c.batch_tokens else 1
        c.batch_tokens = c.batch_size * c.seq_len * world_size * c.grad_accum
        if c.warmup_steps is None:
            c.warmup_steps = 10 if c.max_minutes else max(1, min(200, round(0.05 * c.max_steps)))
        c.warmup_steps = min(c.warmup_steps, c.max_steps)
        if c.lr is None:
            c.lr = 1e-3 if c.dsa == "indexer-warmup" else 2e-3
        if c.mode == "sft":
            c.doc_mask = True
        c.validate()
        return c

    # ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A config from plain values (a config file's, or flags'); unknown names and values of the wrong type
        are a ValueError naming the option, ints are accepted where floats are expected."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, names, n=1)) else u
                     for u in unknown]
            raise ValueError(f"unknown training option(s): {', '.join(hints)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _checked(k, v, hints[k]) for k, v in d.items()})

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "TrainConfig":
        p = Path(path)
        if p.suffix not in (".toml", ".json"):
            raise ValueError(f"{p}: config files must be .toml or .json")
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such config file")
        try:
            d = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{p}: expected a table of training options, got {type(d).__name__}")
        d.update(overrides)
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None


def _checked(name: str, value, hint):
    """``value`` if it fits the field's type hint (ints widen to float, a list or tuple fits either); else
    ValueError."""
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ValueError(f"option {name} cannot be empty")
    kinds = [typing.get_origin(a) or a for a in typing.get_args(hint) if a is not type(None)] or [typing.get_origin(hint) or hint]
    kind = kinds[0]
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (bool, str, dict) and isinstance(value, kind):
        return value
    if kind in (list, tuple):
        if name == "data" and isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)):
            return value
    shown = "a list" if kind in (list, tuple) else {bool: "true or false", int: "an integer", float: "a number",
                                                      str: "a string", dict: "a table"}.get(kind, kind.__name__)
    raise ValueError(f"option {name} must be {shown}, got {value!r}")
