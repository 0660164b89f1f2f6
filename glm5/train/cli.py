"""``glm5 train`` and ``glm5 sft``.

    glm5 train --preset glm5-tiny --data default --out runs/tiny --max-steps 600
    glm5 train --config my_run.toml --lr 1e-3            # flags override the file
    glm5 sft --init-from runs/tiny/hf --out runs/tiny-sft  # default SFT set (reasoning-gym + "I don't know")
    glm5 train --init-from runs/tiny/hf --mtp-only --mtp-target self --mtp-depth 3 --out runs/tiny-drafts
                                                           # distil better MTP drafts; the model itself is unchanged
    torchrun --nproc_per_node 8 -m glm5.cli train --preset glm5-small --data /data/corpus/ --out runs/small

Every TrainConfig field is a flag (``--max-steps``, ``--batch-size``, ``--dsa indexer-warmup``, ...); boolean
fields take ``--x`` / ``--no-x``; ``--set key=value`` overrides model config fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import types
import typing

__all__ = ["add_parser", "config_from_args"]

_HELP = {
    "mode": "pretrain | sft (set by the command)",
    "preset": "model preset (glm5-nano, glm5-tiny, glm5-small, ...)",
    "model_config": "config.json (or directory) of the model to train",
    "init_from": "HF-layout checkpoint directory to start from (weights, config, tokenizer)",
    "data": "'default' or files / directories (.txt, .jsonl, .parquet; for sft .jsonl / .json of OpenAI "
            "'messages', ShareGPT 'conversations' or Alpaca records); several allowed",
    "tokenizer": "tokenizer directory (default: init_from's, else a BPE trained on the data)",
    "out": "run directory: metrics.jsonl, checkpoints/, hf/, train.png",
    "batch_tokens": "global tokens per optimiser step (derives grad_accum)",
    "max_minutes": "time budget in minutes: the LR schedule runs on elapsed time and the run ends (checkpointed) at it",
    "dsa": "DSA stage: dense | indexer-warmup (only the indexer trains) | sparse",
    "mtp_depth": "MTP steps sharing the one MTP layer (GLM-5 trains 3)",
    "mtp_target": "MTP targets: data (the corpus's next tokens) | self (distil the main model's own distribution)",
    "mtp_only": "train only the MTP block on the MTP loss; the main model stays exactly as loaded (use with --init-from)",
    "bias_update_rate": "aux-loss-free router bias step γ per optimiser step (default 0.01; DeepSeek-V3: 0.001; 0 = off)",
    "seq_balance_alpha": "sequence-level balance loss weight (0 = off)",
    "optimizer": "muon | adamw",
    "muon_split": "per-head Muon for the MLA up-projections (GLM-5 Muon Split)",
    "schedule": "cosine | wsd | constant (after linear warm-up)",
    "doc_mask": "pretraining: attention stays within EOS-separated documents",
}


_CHOICES = {"dsa": ["dense", "indexer-warmup", "sparse"], "mtp_target": ["data", "self"], "optimizer": ["muon", "adamw"],
            "schedule": ["cosine", "wsd", "constant"], "muon_impl": ["auto", "glm5", "torch"],
            "device": ["auto", "cpu", "cuda"]}


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


# glm5 sft's defaults where they differ from TrainConfig's (without --config)
SFT_DEFAULTS = {"max_steps": 300, "seq_len": 512, "eval_every": 50, "ckpt_every": 100}


def _default_text(f, mode: str) -> str:
    if mode == "sft" and f.name in SFT_DEFAULTS:
        return str(SFT_DEFAULTS[f.name])
    if mode == "sft" and f.name == "lr":
        return "5e-4 with --init-from, else derived"
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
    else:
        return ""
    if v is None:
        return "derived" if f.name in ("lr", "grad_accum", "warmup_steps") else ""
    if isinstance(v, bool):
        return "on" if v else "off"
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _add_config_flags(p: argparse.ArgumentParser, mode: str = "pretrain") -> None:
    from glm5.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("mode", "model_overrides"):
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        h = _HELP.get(f.name, "")
        d = _default_text(f, mode)
        if d:
            h = f"{h} (default: {d})" if h else f"default: {d}"
        if tp is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif tp in (list, tuple) or typing.get_origin(tp) in (list, tuple):
            kind = float if f.name == "adam_betas" else str
            p.add_argument(flag, dest=f.name, nargs="+", type=kind, default=None, help=h)
        else:
            p.add_argument(flag, dest=f.name, type=tp if tp in (int, float) else str, default=None, help=h,
                           choices=_CHOICES.get(f.name))
    p.add_argument("--config", help="a .toml or .json file of TrainConfig fields (flags override it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field, e.g. --set num_hidden_layers=4 (value parsed as JSON)")
    p.add_argument("-v", "--verbose", action="store_true")


def config_from_args(args, mode: str):
    from glm5.train.config import TrainConfig

    base = TrainConfig.from_file(args.config).to_dict() if args.config else {}
    if not args.config and mode == "sft":
        base.update({"lr": None, **SFT_DEFAULTS})
    base["mode"] = mode
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            base[f.name] = v
    overrides = dict(base.get("model_overrides") or {})
    for item in args.overrides:
        k, _, v = item.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    base["model_overrides"] = overrides
    cfg = TrainConfig.from_dict(base)
    if args.preset is not None and (cfg.init_from or cfg.model_config):
        src = "--init-from" if cfg.init_from else "--model-config"
        raise ValueError(f"--preset {args.preset} and {src} both choose the model; the model comes from {src}, "
                         f"so drop --preset (or --set KEY=VALUE to change a field)")
    if mode == "sft" and cfg.lr is None and cfg.init_from:
        cfg.lr = 5e-4  # fine-tuning a trained model: a gentler peak than from scratch
    return cfg


def _run(args, mode: str) -> int:
    from glm5.train.interrupt import Interrupted
    from glm5.train.trainer import train

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args, mode)
    try:
        summary = train(cfg)
    except Interrupted as e:  # the first SIGINT / SIGTERM: the step finished and was checkpointed
        if int(os.environ.get("RANK", "0")) == 0:
            print(e.message, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the training loop
        if int(os.environ.get("RANK", "0")) == 0:
            from pathlib import Path

            from glm5.train.checkpoint import latest_checkpoint

            last = latest_checkpoint(Path(cfg.out) / "checkpoints")
            print(f"stopped; the same command resumes from {last}" if last else
                  "stopped before the first checkpoint (--ckpt-every); nothing to resume from", file=sys.stderr)
        raise
    if summary and summary.get("nothing_to_train"):  # the trainer printed why
        return 0
    if summary and int(os.environ.get("RANK", "0")) == 0:
        fv = summary.get("final_val") or {}
        msg = f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['elapsed_s']:.0f}s"
        if fv.get("val_loss") is not None:
            msg += f"; val loss {fv['val_loss']:.4f}"
        if summary.get("unigram_baseline") is not None:
            msg += f" (unigram baseline {summary['unigram_baseline']:.4f})"
        print(msg + f"; outputs in {summary['out']}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="pretrain a GLM-5 model (CPU, GPU, torchrun + FSDP2)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_flags(p)
    p.set_defaults(func=lambda a: _run(a, "pretrain"))
    s = sub.add_parser("sft", help="supervised fine-tuning on chat conversations (assistant-only loss)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_flags(s, "sft")
    s.set_defaults(func=lambda a: _run(a, "sft"))
