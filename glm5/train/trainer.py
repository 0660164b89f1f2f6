"""The training loop: pretraining and SFT, one process or many (torchrun + FSDP2), CPU or GPU.

    trainer = Trainer(TrainConfig(preset="glm5-tiny", data=["default"], out="runs/tiny", max_steps=500))
    summary = trainer.fit()

Set-up: tokenizer (given, from ``init_from``, or a BPE trained on the data, cached), tokenised data
(cached), model (preset / config / ``init_from``), DSA stage (the warm-up freezes everything but the
indexers), wrappers (activation checkpointing, compile, FSDP2), optimisers, and — if ``out/checkpoints``
holds a complete checkpoint — the exact state to resume from.

Each step: ``grad_accum`` micro-batches (target counts summed over micro-batches and ranks first, so the
loss is a true global mean), backward, gradient clipping, the optimiser step at the scheduled learning
rate, then the aux-loss-free router-bias update from the step's expert loads. Every ``log_every`` steps a
JSON line goes to ``out/metrics.jsonl``; validation every ``eval_every``; an atomic checkpoint every
``ckpt_every``. At the end: final validation, checkpoint, HF export (``out/hf``), ``out/train.png`` and
``out/summary.json``.

SIGINT / SIGTERM during the loop (``glm5.train.interrupt``): the step in progress finishes on every rank, a
checkpoint is saved and :class:`~glm5.train.interrupt.Interrupted` is raised (the CLI exits 130 / 143); the same
command resumes. A rerun with nothing left to train (its checkpoint past ``max_steps``, or the run finished)
says so and returns (``Trainer.nothing_to_train``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from glm5.config import GLM5Config, preset
from glm5.data.loader import BatchLoader, ConversationRows, PackedRows
from glm5.model.transformer import GLM5ForCausalLM
from glm5.train.balance import ExpertLoadTracker, load_stats, update_router_biases
from glm5.train.checkpoint import Checkpointer, export_hf, latest_checkpoint
from glm5.train.config import TrainConfig
from glm5.train.distributed import (all_reduce, apply_activation_checkpointing, apply_compile, apply_fsdp, barrier,
                                    init_distributed, is_fsdp)
from glm5.train.interrupt import GracefulStop, Interrupted, agreed_signal
from glm5.train.losses import LossConfig, compute_loss, count_targets, mtp_agreement, mtp_steps, stage_modes
from glm5.train.optim import build_optimizers, lr_factor, set_lr

__all__ = ["Trainer", "train"]

log = logging.getLogger("glm5.train")


def trains(name: str, cfg: TrainConfig, model_cfg: GLM5Config) -> bool:
    """Whether parameter ``name`` learns in this run. Parameters that would get no gradient are frozen, so the
    optimiser state (and every checkpoint) covers exactly the trained set:

    * ``dense``: everything but the lightning indexers (attention ignores them);
    * ``indexer-warmup``: only the indexers (stage (a): main model, router biases included, stays fixed);
    * ``sparse``: everything (the indexers only if their KL weight is > 0);
    * the MTP block only when MTP steps run (``mtp_depth`` > 0, and ``mtp_weight`` > 0 outside the warm-up);
    * ``mtp_only``: the MTP block alone, by the same stage rules (embeddings and LM head stay fixed: the main
      model shares them).
    """
    indexer = ".indexer." in name
    mtp_block = name.startswith(f"model.layers.{model_cfg.num_hidden_layers}.")
    if mtp_block and not cfg.mtp_only:
        warm = cfg.dsa == "indexer-warmup"
        if cfg.mtp_depth == 0 or (cfg.mtp_weight == 0 and not warm):
            return False
    if cfg.mtp_only and not mtp_block:
        return False
    if cfg.dsa == "dense":
        return not indexer
    if cfg.dsa == "indexer-warmup":
        return indexer
    return not indexer or cfg.indexer_loss_weight > 0


class Trainer:
    def __init__(self, config: TrainConfig):
        self.dist = init_distributed(config.device)
        cfg = self.cfg = config.resolve(self.dist.world_size)
        self.warmup_steps = cfg.warmup_steps
        self._prev_threads = torch.get_num_threads()
        if self.dist.device.type == "cpu":
            torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // self.dist.local_world_size))
        self.main = self.dist.is_main
        self.out = Path(cfg.out)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.device = self.dist.device
        self.model_cfg = self._base_model_config()
        self.tokenizer = self._setup_tokenizer()
        self.model_cfg = self._finish_model_config(self.model_cfg)
        self._setup_data()
        if cfg.mtp_only and self.model_cfg.num_nextn_predict_layers == 0:
            raise ValueError("mtp_only: this model has no MTP layer (num_nextn_predict_layers = 0)")
        self.model = self._build_model()
        self.tracker = ExpertLoadTracker(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optim = build_optimizers(self.model, kind=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      betas=cfg.adam_betas, momentum=cfg.muon_momentum, muon_split=cfg.muon_split,
                                      muon_impl=cfg.muon_impl, distributed=self.dist.use_fsdp)
        self.loss_cfg = LossConfig(stage=cfg.dsa, mtp_depth=cfg.mtp_depth, mtp_weight=cfg.mtp_weight,
                                   seq_balance_alpha=cfg.seq_balance_alpha, indexer_loss_weight=cfg.indexer_loss_weight,
                                   mtp_only=cfg.mtp_only, mtp_target=cfg.mtp_target)
        self.ckpt = Checkpointer(self.out, self.dist.rank, cfg.keep_checkpoints)
        self.metrics_path = self.out / "metrics.jsonl"
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self._t_start = time.time()  # reset by fit(); elapsed time = elapsed_before + time since _t_start
        self._budget_elapsed = 0.0  # the elapsed time all ranks agree on, for a max_minutes budget (_sync_clock)
        self.last_val: dict | None = None
        self.resumed_from = None
        if cfg.resume:
            self._maybe_resume()
        else:
            self._start_over()
        if self.main and self.resumed_from is None and self.metrics_path.exists():
            self.metrics_path.unlink()  # lines of an earlier attempt that left no checkpoint: this run starts at 0
        if self.main:
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    # ------------------------------------------------------------------------------------- set-up
    def _rank0_first(self, fn):
        """Run ``fn`` on rank 0, then on the others (it fills a cache the others then hit)."""
        if self.main:
            result = fn()
            barrier()
            return result
        barrier()
        return fn()

    def _base_model_config(self) -> GLM5Config:
        cfg = self.cfg
        if cfg.init_from:
            src = Path(cfg.init_from)
            if not (src / "config.json").is_file():
                if (src / "hf" / "config.json").is_file():
                    hint = f"it looks like a training run; its exported model is {src / 'hf'}"
                elif (src / "trainer_state.json").is_file():
                    hint = (f"it is a training checkpoint: rerun with --out {src.parent.parent} to resume that run, "
                            f"or start from its export ({src.parent.parent / 'hf'})")
                else:
                    hint = "expected an HF-layout model directory (config.json + *.safetensors)"
                raise FileNotFoundError(f"--init-from {src}: no config.json there; {hint}")
            mc = GLM5Config.from_pretrained(cfg.init_from)
        elif cfg.model_config:
            mc = GLM5Config.from_pretrained(cfg.model_config)
        else:
            mc = preset(cfg.preset)
        return mc.replace(**cfg.model_overrides) if cfg.model_overrides else mc

    def _setup_tokenizer(self):
        from glm5.data.tokenize import prepare_tokenizer
        from glm5.tokenizer.tokenizer import GLM5Tokenizer

        cfg = self.cfg
        if cfg.tokenizer:
            return GLM5Tokenizer.from_pretrained(cfg.tokenizer)
        if cfg.init_from and (Path(cfg.init_from) / "tokenizer.json").exists():
            return GLM5Tokenizer.from_pretrained(cfg.init_from)
        # Train a byte-level BPE of the model's vocabulary size on the data (on the default corpus for SFT).
        sources = cfg.data if cfg.mode == "pretrain" else ["default"]
        tok, _ = self._rank0_first(lambda: prepare_tokenizer(sources, self.model_cfg.vocab_size, cfg.cache_dir,
                                                             text_field=cfg.text_field))
        return tok

    def _finish_model_config(self, mc: GLM5Config) -> GLM5Config:
        tok, cfg = self.tokenizer, self.cfg
        if tok.vocab_size > mc.vocab_size:
            raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model's vocab_size is {mc.vocab_size}")
        if not cfg.init_from:
            mc = mc.replace(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_ids)
        if cfg.seq_len > mc.max_position_embeddings:
            raise ValueError(f"seq_len {cfg.seq_len} exceeds max_position_embeddings {mc.max_position_embeddings}")
        return mc

    def _setup_data(self) -> None:
        cfg, d = self.cfg, self.dist
        pad = self.tokenizer.pad_token_id or 0
        self.pad_id = pad
        self.unigram_baseline = None
        no_val = ""
        if cfg.mode == "pretrain":
            from glm5.data.tokenize import load_tokens, prepare_dataset, read_manifest

            ds = self._rank0_first(lambda: prepare_dataset(cfg.data, self.tokenizer, cfg.cache_dir,
                                                           val_fraction=cfg.val_fraction, text_field=cfg.text_field))
            manifest = read_manifest(ds)
            ub = manifest["unigram"]["val_cross_entropy"]  # NaN (older manifests) or None without validation text
            self.unigram_baseline = ub if ub is not None and math.isfinite(ub) else None
            eos = manifest["eos_token_id"]
            train_tokens = load_tokens(ds, "train")
            if len(train_tokens) < cfg.seq_len + 1:
                raise ValueError(f"the training data ({' '.join(map(str, cfg.data))}) has {len(train_tokens)} tokens, "
                                 f"not enough for one row of --seq-len {cfg.seq_len}: add text or lower --seq-len")
            train_rows = PackedRows(train_tokens, cfg.seq_len, eos_id=eos, doc_mask=cfg.doc_mask)
            val_tokens = load_tokens(ds, "val")
            val_rows = PackedRows(val_tokens, cfg.seq_len, eos_id=eos, doc_mask=cfg.doc_mask) \
                if len(val_tokens) > cfg.seq_len else None
            if val_rows is None and cfg.val_fraction > 0:
                no_val = (f"the held-out split has {len(val_tokens)} tokens, less than one row of --seq-len "
                          f"{cfg.seq_len} (the data is cut into ~8K-character sections and val_fraction of them "
                          f"are held out; more text gives a validation split)")
        else:
            from glm5.data.sft import load_sft_split, prepare_sft_dataset

            ds = self._rank0_first(lambda: prepare_sft_dataset(cfg.data, self.tokenizer, cfg.cache_dir,
                                                               n_default=cfg.sft_examples,
                                                               val_fraction=max(cfg.val_fraction, 0.0)))
            t, m, o, manifest = load_sft_split(ds, "train")
            train_rows = ConversationRows(t, m, o, cfg.seq_len, pad)
            vt, vm, vo, _ = load_sft_split(ds, "val")
            val_rows = ConversationRows(vt, vm, vo, cfg.seq_len, pad) if len(vo) > 1 else None
            if val_rows is None and cfg.val_fraction > 0:
                no_val = "no conversation is held out (too few records for val_fraction)"
        self.dataset_dir = ds
        self.dataset_manifest = manifest
        try:
            self.train_loader = BatchLoader(train_rows, cfg.batch_size, seed=cfg.seed, rank=d.rank,
                                            world_size=d.world_size)
        except ValueError as e:
            raise ValueError(f"the training data ({' '.join(map(str, cfg.data))}) is too small: {e}; "
                             f"lower --batch-size or --seq-len, or add data") from None
        self.val_loader = None
        if val_rows is not None:
            # A small validation split still validates: the eval batch shrinks to what the split can fill.
            eval_bs = min(cfg.batch_size, len(val_rows) // d.world_size)
            if eval_bs >= 1:
                self.val_loader = BatchLoader(val_rows, eval_bs, seed=cfg.seed, rank=d.rank, world_size=d.world_size,
                                              shuffle=False)
            else:
                no_val = f"the held-out split makes {len(val_rows)} rows, fewer than the {d.world_size} processes"
        if self.val_loader is None and cfg.val_fraction > 0 and self.main:
            log.warning("no validation loss in this run: %s", no_val)

    def _build_model(self) -> GLM5ForCausalLM:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        if cfg.init_from:
            model = GLM5ForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32, device="cpu", config=self.model_cfg)
        else:
            model = GLM5ForCausalLM(self.model_cfg).init_weights(cfg.seed)
        model.to(self.device).train()
        for name, p in model.named_parameters():
            p.requires_grad_(trains(name, cfg, self.model_cfg))
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        if cfg.compile:
            apply_compile(model)
        if self.dist.use_fsdp:
            apply_fsdp(model, self.dist, mixed_precision=self.device.type == "cuda")
        return model

    def autocast(self):
        # bf16 on GPU comes from FSDP2's MixedPrecisionPolicy (see apply_fsdp); CPU trains in fp32.
        if self.device.type == "cuda" and not is_fsdp(self.model):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------------------- resume
    # options that shape the model's parameters or the optimiser's state: a checkpoint saved under other values
    # may not load, and the error then names them
    _STATE_OPTIONS = ("preset", "model_config", "model_overrides", "init_from", "optimizer", "muon_split", "muon_impl",
                      "mtp_depth", "mtp_weight", "mtp_only", "indexer_loss_weight")

    def _maybe_resume(self) -> None:
        path = latest_checkpoint(self.ckpt.dir)
        if path is None:
            return
        saved = json.loads((path / "trainer_state.json").read_text()).get("config", {})
        now = self.cfg.to_dict()
        for key in ("mode", "dsa", "seq_len"):
            if key in saved and saved[key] != now[key]:
                raise ValueError(f"{path}: checkpoint has {key}={saved[key]!r}, this run {now[key]!r}; "
                                 f"use a new --out (or --init-from an export) to change it")
        def groups():
            return [(g.get("name"), g.get("base_lr") is not None, len(g["params"])) for g in self.optim.param_groups]

        expected = groups()
        try:
            state = self.ckpt.load(path, self.model, self.optim)
            if groups() != expected:  # e.g. another Muon layout: the state loads, into the wrong groups
                raise RuntimeError("the optimiser's parameter groups differ from the checkpoint's")
        except Exception as e:  # a missing or mis-shaped key, or mismatched optimiser groups
            changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in self._STATE_OPTIONS if k in saved and saved[k] != now[k]]
            why = f"changed since it was saved: {'; '.join(changed)}" if changed else f"{type(e).__name__}: {e}"
            raise ValueError(f"cannot resume from {path}: its model/optimiser state does not fit this run ({why}); "
                             f"keep the run's options to resume, or use a new --out "
                             f"(--init-from {self.out / 'hf'} starts from the exported weights)") from e
        if self.main and saved.get("data") not in (None, now["data"]):
            log.warning("resuming with --data %s, the checkpoint was trained on %s: the data order continues from "
                        "the saved position, in the new data", " ".join(now["data"]), " ".join(saved["data"]))
        self.step = state["step"]
        self.tokens_seen = state["tokens"]
        self.elapsed_before = state["elapsed"]
        self.train_loader.load_state_dict(state["loader"])
        self.last_val = state.get("last_val")
        self.resumed_from = str(path)
        if self.main:  # drop metric lines written after the checkpoint by the interrupted run
            from glm5.train.plots import read_metrics

            kept = [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= self.step]
            tmp = self.metrics_path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.metrics_path)
            print(f"resuming from {path} (step {self.step}); --no-resume starts over", file=sys.stderr)
        log.info("resumed from %s at step %d", path, self.step)

    def _start_over(self) -> None:
        """``resume=False`` where an earlier run left checkpoints: they are replaced by this run's first
        checkpoint (not before, so nothing is lost if this run stops early), never mixed with it."""
        stale = sorted(p for p in self.ckpt.dir.glob("step_*") if p.is_dir()) if self.ckpt.dir.is_dir() else []
        if stale and self.main:
            log.warning("--no-resume: starting from scratch; the earlier run's checkpoints in %s (newest %s) are "
                        "deleted when this run saves its first one", self.ckpt.dir, stale[-1].name)
        self.ckpt.replaces = stale

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "tokens": self.tokens_seen, "elapsed": self._elapsed(),
                 "loader": self.train_loader.state_dict(), "last_val": self.last_val, "config": self.cfg.to_dict()}
        return self.ckpt.save(self.step, self.model, self.optim, state)

    # ------------------------------------------------------------------------------------- steps
    def _elapsed(self) -> float:
        return self.elapsed_before + (time.time() - self._t_start)

    def _sync_clock(self) -> None:
        """With a time budget, the ranks take the slowest clock as the elapsed time, so that every rank follows
        the same schedule and ends after the same step (each rank's own clock could end one rank a step early,
        leaving the others waiting in a collective)."""
        if self.cfg.max_minutes is not None:
            t = torch.tensor([self._elapsed()], dtype=torch.float64, device=self.device)
            self._budget_elapsed = float(all_reduce(t, op=dist.ReduceOp.MAX).item())

    def train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        t0 = time.time()
        micro = [next(self.train_loader) for _ in range(cfg.grad_accum)]
        counts = sum(count_targets(b, self.loss_cfg.mtp_depth) for b in micro)
        counts = all_reduce(counts.to(self.device)).cpu()
        factor = lr_factor(self.step, cfg.max_steps, self.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction,
                           progress=self.time_progress())
        lr = set_lr(self.optim, factor)
        D = self.loss_cfg.mtp_depth
        # [ce_sum, mtp_sum_1..D, kl_sum, kl_n, bal_sum, bal_n]
        acc = torch.zeros(1 + D + 4, dtype=torch.float64)
        fsdp = is_fsdp(model)
        for i, b in enumerate(micro):
            b = b.to(self.device)
            if fsdp:
                model.set_requires_gradient_sync(i == len(micro) - 1)
            self.tracker.active = True
            with self.autocast():
                loss, st = compute_loss(model, b, self.loss_cfg, counts.tolist(), grad_scale=self.dist.world_size,
                                        n_micro=len(micro), tracker=self.tracker, pad_id=self.pad_id)
            self.tracker.active = False
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"non-finite loss at step {self.step + 1}: {st}")
            loss.backward()
            acc[0] += st["ce_sum"]
            for d, s in enumerate(st["mtp_sums"]):
                acc[1 + d] += s
            if st["indexer_kl"] is not None:
                acc[1 + D] += st["indexer_kl"]
                acc[2 + D] += 1
            if st["balance"] is not None:
                acc[3 + D] += st["balance"]
                acc[4 + D] += 1
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        loads = self.tracker.take_loads()
        if cfg.mtp_only:  # the main model's router biases stay as loaded; only the MTP block balances
            loads = {i: load for i, load in loads.items() if i == self.model_cfg.num_hidden_layers}
        rate = 0.0 if cfg.dsa == "indexer-warmup" else cfg.bias_update_rate
        global_loads = update_router_biases(model, loads, rate)
        acc = all_reduce(acc.to(self.device)).cpu()
        step_time = time.time() - t0
        n_tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.dist.world_size
        self.tokens_seen += n_tokens
        self.step += 1
        ce = float(acc[0] / max(1.0, counts[0]))
        mtp_steps = [float(acc[1 + d] / max(1.0, counts[1 + d])) for d in range(D)]
        mtp = sum(mtp_steps) / len(mtp_steps) if mtp_steps else None
        kl = float(acc[1 + D] / acc[2 + D]) if acc[2 + D] > 0 else None
        bal = float(acc[3 + D] / acc[4 + D]) if acc[4 + D] > 0 else None
        if cfg.dsa == "indexer-warmup":
            total = kl
        elif cfg.mtp_only:
            total = mtp
        else:
            total = ce + (cfg.mtp_weight * mtp if mtp is not None else 0.0)
            total += cfg.seq_balance_alpha * bal if bal is not None else 0.0
            total += cfg.indexer_loss_weight * kl if (kl is not None and cfg.dsa == "sparse") else 0.0
        self._sync_clock()  # the budget's clock for _done() after this step and the next step's schedule
        return {"kind": "train", "step": self.step, "loss": total, "ce": ce, "mtp": mtp, "mtp_steps": mtp_steps,
                "indexer_kl": kl, "balance_loss": bal, "lr": lr, "grad_norm": float(grad_norm),
                "tokens": self.tokens_seen, "tok_per_s": n_tokens / step_time, "step_time": step_time,
                "elapsed": self._elapsed(), "balance": load_stats(global_loads),
                # full per-layer token counts per expert, at the validation cadence (and on the last step)
                "expert_load": {str(i): [int(v) for v in load.tolist()] for i, load in global_loads.items()}
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or self._done() else None}

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        if self.val_loader is None:
            return None
        cfg, model = self.cfg, self.model
        dsa, _ = stage_modes(cfg.dsa)
        want_kl = cfg.dsa in ("indexer-warmup", "sparse")
        model.eval()
        self.tracker.active = False
        D = mtp_steps(model, self.loss_cfg.mtp_depth)
        # ce_sum, n, kl_sum, kl_n, MTP positions, then per MTP step: top-1 matches, chained matches
        acc = torch.zeros(5 + 2 * D, dtype=torch.float64)
        for b in self.val_loader.eval_batches(cfg.eval_batches):
            b = b.to(self.device)
            with self.autocast():
                out = model(b.input_ids, position_ids=b.position_ids, attention_mask=b.attention_mask, dsa=dsa,
                            indexer_loss=("dense" if cfg.dsa == "indexer-warmup" else "sparse") if want_kl else None)
                if D:
                    matches, chained, n_pos = mtp_agreement(model, b, out.hidden_states, out.logits, D, dsa, self.pad_id)
                    acc[4] += n_pos
                    acc[5:5 + D] += torch.tensor(matches, dtype=torch.float64)
                    acc[5 + D:] += torch.tensor(chained, dtype=torch.float64)
            acc[0] += float(torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), b.labels.flatten(),
                                                              ignore_index=-100, reduction="sum"))
            acc[1] += b.n_tokens
            if out.aux_losses:
                acc[2] += float(torch.stack(out.aux_losses).mean())
                acc[3] += 1
        model.train()
        self.tracker.active = True
        acc = all_reduce(acc.to(self.device)).cpu()
        if acc[1] == 0:
            return None
        val = float(acc[0] / acc[1])
        rec = {"kind": "val", "step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0)),
               "val_tokens": int(acc[1])}
        if acc[3] > 0:
            rec["val_indexer_kl"] = float(acc[2] / acc[3])
        if D and acc[4] > 0:
            # MTP step d's top-1 = the main model's top-1, and the teacher-forced acceptance-length estimate
            rec["val_mtp_agreement"] = [round(float(m / acc[4]), 4) for m in acc[5:5 + D]]
            rec["val_mtp_accept_len"] = round(1.0 + float(acc[5 + D:].sum() / acc[4]), 4)
        if self.unigram_baseline is not None:
            rec["unigram_baseline"] = self.unigram_baseline
        self.last_val = rec
        return rec

    def time_progress(self) -> float | None:
        """With a time budget (``max_minutes``) the schedule runs on elapsed time: the fraction of the budget
        used (restored on resume). None for step-based runs."""
        if self.cfg.max_minutes is None:
            return None
        return min(1.0, self._budget_elapsed / (60.0 * self.cfg.max_minutes))

    def _done(self) -> bool:
        return self.step >= self.cfg.max_steps or (self.time_progress() or 0.0) >= 1.0

    def _log(self, rec: dict) -> None:
        if self.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    # --------------------------------------------------------------------------------------- fit
    def nothing_to_train(self) -> str | None:
        """The line for a resumed run with nothing left to do, else None: its checkpoint holds more than
        ``max_steps`` steps, or it is done (``max_steps``, or the ``max_minutes`` budget used up) and
        ``summary.json`` records it as finished at this step (with its export, if one is asked for). A run stopped
        right after its last step (``Interrupted``, or killed) is done but not finished: its rerun still
        validates, exports and writes the summary. Rank 0 decides for all."""
        if self.resumed_from is None:
            return None
        cfg = self.cfg
        done = finished = False
        if self.main:
            done = self._done()
            try:
                prev = json.loads((self.out / "summary.json").read_text())
            except (OSError, ValueError):
                prev = {}
            finished = prev.get("steps") == self.step and (not cfg.export or bool(prev.get("export")))
        flags = all_reduce(torch.tensor([int(done), int(finished)], device=self.device)).tolist()
        done, finished = bool(flags[0]), bool(flags[1])
        redo = "pass --no-resume / a new --out"
        if self.step > cfg.max_steps or (done and finished and self.step == cfg.max_steps):
            return (f"{self.out} already holds step {self.step} >= --max-steps {cfg.max_steps}: nothing to train; "
                    f"raise --max-steps, or {redo}")
        if done and finished:
            return (f"{self.out} already holds step {self.step}, which used up --max-minutes {cfg.max_minutes}: "
                    f"nothing to train; raise --max-minutes, or {redo}")
        return None

    def fit(self, handle_signals: bool = True) -> dict:
        """Train to ``max_steps`` (or the time budget) and finish (validation, checkpoint, export, plot, summary);
        returns the summary. ``handle_signals``: a first SIGINT / SIGTERM stops the loop after its step with a
        checkpoint and raises :class:`Interrupted` (``glm5.train.interrupt``; the handlers are restored after the
        loop). A resumed run with nothing left to train returns at once, its summary's ``nothing_to_train`` the
        line that says so (printed to stderr too)."""
        from tqdm import tqdm

        cfg = self.cfg
        self._t_start = time.time()
        self._sync_clock()
        n_params = sum(p.numel() for p in self.model.parameters())
        note = self.nothing_to_train()
        if note:
            if self.main:
                print(note, file=sys.stderr)
            return {"steps": self.step, "tokens": self.tokens_seen, "elapsed_s": self.elapsed_before,
                    "params": n_params, "final_val": self.last_val, "unigram_baseline": self.unigram_baseline,
                    "out": str(self.out), "resumed_from": self.resumed_from, "nothing_to_train": note}
        if self.main and self.step == 0:
            self._log({"kind": "meta", "step": 0, "params": n_params, "world_size": self.dist.world_size,
                       "device": str(self.device), "dataset": str(self.dataset_dir),
                       "unigram_baseline": self.unigram_baseline, "config": cfg.to_dict()})
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (self.main and cfg.progress), dynamic_ncols=True,
                   file=sys.stderr, desc=f"{cfg.mode}[{cfg.dsa}]", unit="step")
        # a resumed run was checkpointed (and maybe validated) at its current step: not again, if it is already done
        saved_at = self.step if self.resumed_from else None
        evaluated_at = self.step if (self.last_val or {}).get("step") == self.step else None
        tok_rate = None
        done = self._done()
        stop = GracefulStop(announce=self.main) if handle_signals else None
        with stop if stop is not None else contextlib.nullcontext():
            while not done:
                rec = self.train_step()
                done = self._done()
                if cfg.max_minutes is not None:  # the bar counts steps; its total is the steps the budget allows
                    frac = self.time_progress()
                    if frac:
                        bar.total = min(cfg.max_steps, max(self.step, round(self.step / max(frac, 1e-9))))
                tok_rate = rec["tok_per_s"] if tok_rate is None else 0.9 * tok_rate + 0.1 * rec["tok_per_s"]
                if self.step % cfg.log_every == 0 or done:
                    self._log(rec)
                post = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{tok_rate:,.0f}", "lr": f"{rec['lr']:.2e}"}
                if self.last_val:
                    post["val"] = f"{self.last_val['val_loss']:.4f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    v = self.evaluate()
                    evaluated_at = self.step
                    if v:
                        self._log(v)
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and not done:  # the last one follows the final
                    self.save_checkpoint()                                           # validation, which it records
                    saved_at = self.step
                if stop is not None:  # every rank, every step: they all stop after the same one
                    sig = agreed_signal(stop.signum, self.device)
                    if sig:
                        bar.close()
                        if saved_at != self.step:
                            self.save_checkpoint()
                        raise Interrupted(sig, self.step, self.ckpt.dir / f"step_{self.step:08d}")
        bar.close()
        if evaluated_at != self.step:
            v = self.evaluate()
            if v:
                self._log(v)
        if saved_at != self.step:
            self.save_checkpoint()
        summary = {"steps": self.step, "tokens": self.tokens_seen, "elapsed_s": self._elapsed(), "params": n_params,
                   "final_val": self.last_val, "unigram_baseline": self.unigram_baseline, "out": str(self.out),
                   "resumed_from": self.resumed_from}
        if cfg.export:
            export_hf(self.model, self.out / "hf", self.tokenizer, rank=self.dist.rank)
            summary["export"] = str(self.out / "hf")
        if self.main:
            if cfg.plot:
                try:
                    from glm5.train.plots import plot_metrics

                    summary["plot"] = str(plot_metrics(self.metrics_path, self.out / "train.png",
                                                       title=f"{cfg.mode} {self.model_cfg.num_hidden_layers}L "
                                                             f"{n_params / 1e6:.1f}M [{cfg.dsa}]"))
                except ImportError as e:
                    log.warning("no plot: %s", e)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def close(self) -> None:
        self.tracker.remove()
        torch.set_num_threads(self._prev_threads)
        if self.dist.backend is not None and dist.is_initialized():
            dist.destroy_process_group()


def train(config: TrainConfig, handle_signals: bool = True) -> dict:
    """Build a Trainer, run it, clean up; returns the summary (see ``Trainer.fit`` for ``handle_signals``)."""
    t = Trainer(config)
    try:
        return t.fit(handle_signals=handle_signals)
    finally:
        t.close()
