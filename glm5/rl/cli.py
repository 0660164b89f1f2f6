"""``glm5 rl``: slime-style RL post-training of a checkpoint on verifiable tasks.

    glm5 rl --model runs/sft/hf --task basic_arithmetic --task gsm_symbolic --unanswerable-frac 0.2 \\
            --mode async --tau 2 --steps 50 --groups 8 --group-size 8 --out runs/rl

See glm5/rl/runner.py for what a run does and writes.
"""

from __future__ import annotations

import json

__all__ = ["add_parser", "config_from_args"]


def add_parser(sub) -> None:
    p = sub.add_parser("rl", help="RL post-training (GRPO/GSPO/PPO/DDIS; sync, one-step-off or async rollouts)")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="checkpoint directory (config, safetensors, tokenizer)")
    g.add_argument("--out", default="runs/rl", help="output directory (metrics.jsonl, rl.png, summary.json, hf/)")
    g.add_argument("--task", action="append", default=None,
                   help="task generator, repeatable: a reasoning-gym name with optional config "
                        "('basic_arithmetic:max_terms=2,max_digits=1', 'gsm_symbolic', 'countdown') or 'arith'")
    g.add_argument("--tasks-file", default=None, help="JSONL of tasks instead of generating them")
    g.add_argument("--eval-tasks-file", default=None,
                   help="JSONL of held-out tasks for the before/after evaluation (default: generated ones; with --tasks-file "
                        "and without this, no evaluation)")
    g.add_argument("--unanswerable-frac", type=float, default=0.2,
                   help="share of unanswerable questions (right answer: \"I don't know\") in generated task sets")
    g.add_argument("--n-train", type=int, default=2000, help="generated training tasks")
    g.add_argument("--n-eval", type=int, default=200, help="generated held-out tasks (disjoint from training)")
    g.add_argument("--seed", type=int, default=0, help="task generation, prompt order and rollout sampling")
    g = p.add_argument_group("schedule")
    g.add_argument("--mode", choices=["sync", "one-step-off", "async"], default="sync",
                   help="sync: on-policy; one-step-off: generate batch k+1 while training on k; async: continuous "
                        "generation, samples at most --tau versions stale")
    g.add_argument("--steps", type=int, default=20, help="train steps (one rollout batch and weight version each)")
    g.add_argument("--groups", type=int, default=8, help="prompts per train step (B)")
    g.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
    g.add_argument("--tau", type=int, default=None, help="staleness bound in versions (async default 2)")
    g.add_argument("--max-inflight-groups", type=int, default=None, help="async: open groups (default 2×groups)")
    g.add_argument("--over-sampling", type=int, default=0,
                   help="sync / one-step-off: extra groups generated per batch, the slowest aborted")
    g.add_argument("--push-interval", type=int, default=1, help="push weights to the rollout side every N steps")
    g.add_argument("--dynamic-sampling", action="store_true", help="drop groups with zero reward variance")
    g.add_argument("--max-dropped-in-a-row", type=int, default=None,
                   help="stop with an error after this many finished groups in a row were dropped (failed, zero "
                        "reward variance or stale) and none kept (default: 10 batches' worth, at least 64; 0: never)")
    g.add_argument("--partial-rollout", dest="partial_rollout", action="store_true", default=None,
                   help="generations interrupted by a weight push resume where they stopped (default in async mode)")
    g.add_argument("--no-partial-rollout", dest="partial_rollout", action="store_false",
                   help="interrupted generations restart from scratch")
    g = p.add_argument_group("rollout")
    g.add_argument("--max-new-tokens", type=int, default=128, help="response budget per trajectory")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="rollout temperature (the trainer's log-probs use the same T)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="rollout nucleus sampling; keep 1 with --tis/--is-mask/--loss ddis/--old-logp rollout")
    g.add_argument("--reward", default="abstention", help="abstention | binary | module:function")
    g.add_argument("--tools", default="", help="comma list: calculator,python")
    g.add_argument("--max-turns", type=int, default=None, help="model turns per trajectory (default 4 with tools)")
    g.add_argument("--system", default=None, help="system prompt for every task (default none)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="engine: sequences decoded at once")
    g.add_argument("--max-model-len", type=int, default=1024, help="engine: prompt + response tokens at most")
    g.add_argument("--max-num-batched-tokens", type=int, default=4096, help="engine prefill tokens per step")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=["ppo", "gspo", "ddis", "cispo", "reinforce"], default="ppo",
                   help="ppo: token-ratio clip; gspo: sequence-level ratio; ddis: GLM-5's double-sided IS against the "
                        "rollout log-probs; cispo: clipped-weight REINFORCE; reinforce")
    g.add_argument("--advantage", choices=["grpo", "mean", "rloo", "none"], default="grpo",
                   help="grpo: (r - group mean) / group std; mean: r - group mean; rloo: leave-one-out baseline")
    g.add_argument("--eps-low", type=float, default=None, help="default 0.2 (GSPO 3e-4)")
    g.add_argument("--eps-high", type=float, default=None, help="default 0.28 (GSPO 4e-4)")
    g.add_argument("--dual-clip", type=float, default=None, help="dual-clip c > 1 bounding negative-advantage loss")
    g.add_argument("--agg", choices=["token", "seq"], default="token",
                   help="loss averaging: over all tokens of the batch (DAPO) or per sequence, then over sequences")
    g.add_argument("--tis", choices=["tis", "icepop"], default=None,
                   help="train/inference mismatch weight exp(old - rollout log-prob): truncated (tis) or masked "
                        "outside [1/c, c] (icepop)")
    g.add_argument("--tis-clip", type=float, default=2.0, help="c of --tis")
    g.add_argument("--is-mask", action="store_true", help="GLM-5 double-sided IS mask vs rollout log-probs")
    g.add_argument("--is-eps-low", type=float, default=0.2, help="--is-mask band: ratio > 1 - this")
    g.add_argument("--is-eps-high", type=float, default=0.28, help="--is-mask band: ratio < 1 + this")
    g.add_argument("--kl-coef", type=float, default=0.0, help="KL penalty to the starting policy (0: none)")
    g.add_argument("--kl-type", choices=["k1", "k2", "k3"], default="k3", help="KL estimator")
    g.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus")
    g = p.add_argument_group("optimiser")
    g.add_argument("--lr", type=float, default=1e-5, help="learning rate (constant)")
    g.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw", help="optimiser")
    g.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: none)")
    g.add_argument("--updates-per-batch", type=int, default=1,
                   help="optimiser steps per rollout batch (mini-batches of whole groups)")
    g.add_argument("--freeze-router", action="store_true", help="keep the MoE router (gate) weights fixed during RL")
    g.add_argument("--old-logp", choices=["recompute", "rollout"], default="recompute",
                   help="π_old of the PPO ratio: the trainer's own log-probs, or the rollout engine's (bypass)")
    g.add_argument("--micro-batch-tokens", type=int, default=8192, help="padded tokens per trainer forward")
    g.add_argument("--reset-optimizer", action="store_true", help="reset optimiser state after every weight push")
    g.add_argument("--mtp-weight", type=float, default=0.0,
                   help="> 0: train the MTP layer online, by self-distillation towards the policy (fresh drafts for "
                        "speculative rollouts); the policy's update is unchanged")
    g.add_argument("--mtp-depth", type=int, default=1, help="MTP steps trained with --mtp-weight")
    g.add_argument("--mtp-lr", type=float, default=None, help="the MTP layer's learning rate (default: --lr)")
    g = p.add_argument_group("placement")
    g.add_argument("--placement", choices=["process", "colocate", "ray"], default="process",
                   help="rollout engine in its own process (default), in the trainer process, or a Ray actor")
    g.add_argument("--offload-rollout", action="store_true",
                   help="--mode sync, --placement colocate or process: the rollout engines sleep while the trainer "
                        "runs (KV cache released, weights discarded before a push or offloaded to host), as slime's "
                        "colocated mode frees the GPU for training")
    g.add_argument("--weight-sync", choices=["shm", "dist"], default="shm",
                   help="trainer -> rollout weights: shared memory, or a torch.distributed broadcast")
    g.add_argument("--dist-backend", choices=["gloo", "nccl"], default="gloo", help="backend of --weight-sync dist")
    g.add_argument("--device", default="cpu", help="trainer device")
    g.add_argument("--rollout-device", default="cpu",
                   help="rollout engine device; on CUDA the rollout workers and their tensor-parallel ranks take "
                   "consecutive GPUs from its index (cuda:1, 2 workers, --rollout-tp 2: GPUs 1-4)")
    g.add_argument("--rollout-workers", type=int, default=1,
                   help="rollout engines, each its own process (or Ray actor); groups go to the least-loaded one")
    g.add_argument("--rollout-tp", type=int, default=1,
                   help="tensor-parallel processes per rollout engine (each holds a shard of the weights; "
                        "--placement process only)")
    g.add_argument("--rollout-spec-tokens", type=int, default=0,
                   help="MTP speculative decoding in the rollout engine: drafts per step (0 = off)")
    g.add_argument("--rollout-spec-disable-batch-size", type=int, default=0, metavar="N",
                   help="with --rollout-spec-tokens: pause drafting while more than N rollout sequences run (0 = "
                        "never), so drafts speed up a batch's long tail only; seeded rollouts keep their tokens")
    g.add_argument("--rollout-kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3", "fp8_ds_mla"],
                   help="the rollout engines' KV cache: the model's dtype, or GLM-5's FP8 layouts (more sequences per "
                        "engine; pair it with --tis or --loss ddis for the larger train/rollout log-prob gap)")
    g.add_argument("--rollout-kv-cache-memory", type=_bytes, default=None, metavar="BYTES",
                   help="KV cache per rollout engine, e.g. 2GiB or 512MiB (default: room for --max-num-seqs full "
                        "sequences); on a GPU shared with the trainer, what each wake-up takes back")
    g.add_argument("--train-threads", type=int, default=None, help="trainer threads (default: its share of the cores)")
    g.add_argument("--rollout-threads", type=int, default=None, help="threads per rollout worker")
    g.add_argument("--ray-address", default=None, help="--placement ray: cluster address (default: a local Ray)")
    g.add_argument("--ray-num-gpus", type=float, default=0.0, help="--placement ray: GPUs per rollout actor")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation before and after")
    g.add_argument("--eval-every", type=int, default=0, help="also evaluate on the held-out set every N steps")
    g.add_argument("--eval-sampled", type=int, default=0,
                   help="also evaluate sampled accuracy (rollout temperature) with this many samples per task")
    g.add_argument("--no-save", action="store_true", help="do not export the final policy to OUT/hf")
    g.add_argument("--save-every", type=int, default=0,
                   help="steps between resumable checkpoints in OUT/checkpoints (default 0: none; a first "
                        "Ctrl-C / SIGTERM saves one and stops)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (0: all)")
    g.add_argument("--no-resume", action="store_true",
                   help="start over even if OUT/checkpoints holds a checkpoint (it is removed)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def config_from_args(a):
    from glm5.rl.losses import LossConfig
    from glm5.rl.manager import ManagerConfig
    from glm5.rl.rollout import RolloutConfig
    from glm5.rl.runner import DEFAULT_TASKS, RLConfig
    from glm5.rl.trainer import TrainerConfig

    gspo = a.loss == "gspo"
    loss = LossConfig(loss_type=a.loss, eps_low=a.eps_low if a.eps_low is not None else (3e-4 if gspo else 0.2),
                      eps_high=a.eps_high if a.eps_high is not None else (4e-4 if gspo else 0.28),
                      dual_clip=a.dual_clip, agg=a.agg, tis=a.tis, tis_clip=a.tis_clip, is_mask=a.is_mask,
                      is_eps_low=a.is_eps_low, is_eps_high=a.is_eps_high, kl_coef=a.kl_coef, kl_type=a.kl_type,
                      entropy_coef=a.entropy_coef)
    trainer = TrainerConfig(lr=a.lr, optimizer=a.optimizer, weight_decay=a.weight_decay, grad_clip=a.grad_clip,
                            advantage=a.advantage, loss=loss, micro_batch_tokens=a.micro_batch_tokens,
                            updates_per_batch=a.updates_per_batch, old_logp=a.old_logp,
                            freeze_router=a.freeze_router, reset_optimizer=a.reset_optimizer,
                            mtp_weight=a.mtp_weight, mtp_depth=a.mtp_depth, mtp_lr=a.mtp_lr)
    tools = [t for t in a.tools.split(",") if t]
    rollout = RolloutConfig(temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
                            max_turns=a.max_turns or (4 if tools else 1), tools=tools, reward=a.reward, seed=a.seed,
                            system=a.system)
    tau = a.tau if a.tau is not None else (2 if a.mode == "async" else None)
    manager = ManagerConfig(mode=a.mode, num_steps=a.steps, groups_per_step=a.groups, tau=tau,
                            max_inflight_groups=a.max_inflight_groups or 2 * a.groups, over_sampling=a.over_sampling,
                            push_interval=a.push_interval, max_dropped_in_a_row=a.max_dropped_in_a_row,
                            offload_rollout=a.offload_rollout)
    return RLConfig(model=a.model, out=a.out, tasks=a.task or list(DEFAULT_TASKS), tasks_file=a.tasks_file,
                    eval_tasks_file=a.eval_tasks_file, unanswerable_frac=a.unanswerable_frac, n_train=a.n_train,
                    n_eval=a.n_eval, seed=a.seed, group_size=a.group_size, manager=manager, rollout=rollout,
                    trainer=trainer, dynamic_sampling=a.dynamic_sampling, partial_rollout=a.partial_rollout,
                    placement=a.placement, weight_sync=a.weight_sync, dist_backend=a.dist_backend,
                    rollout_workers=a.rollout_workers, rollout_tp=a.rollout_tp, rollout_threads=a.rollout_threads,
                    train_threads=a.train_threads, device=a.device,
                    rollout_device=a.rollout_device, max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len,
                    max_num_batched_tokens=a.max_num_batched_tokens, rollout_spec_tokens=a.rollout_spec_tokens,
                    rollout_spec_disable_batch_size=a.rollout_spec_disable_batch_size,
                    rollout_kv_cache_dtype=a.rollout_kv_cache_dtype, rollout_kv_cache_memory=a.rollout_kv_cache_memory,
                    eval_before=not a.no_eval, eval_after=not a.no_eval, eval_every=a.eval_every, eval_sampled=a.eval_sampled,
                    save=not a.no_save, save_every=a.save_every, keep_checkpoints=a.keep_checkpoints,
                    resume=not a.no_resume, progress=not a.no_progress, ray_address=a.ray_address,
                    ray_num_gpus=a.ray_num_gpus)


def _bytes(text: str) -> int:
    """A byte count: an integer, optionally with a binary unit (KiB, MiB, GiB; K / M / G mean the same)."""
    import argparse
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a positive byte count: {text!r} (e.g. 2GiB, 512MiB, 1073741824)")
    return int(float(m.group(1)) * 1024 ** " KMG".index(m.group(2).upper() or " "))


def _fmt(m: dict | None) -> str:
    """One evaluation in a line; a rate with nothing to count (no answered / unanswerable questions) is "n/a", not a
    0 that reads like a perfect score."""
    if not m:
        return "-"
    lo, hi = m["accuracy_ci"]
    hlo, hhi = m["hallucination_rate_ci"]
    if m.get("n_answered", 1):
        hall = f"hallucination {m['hallucination_rate']:.3f} [{hlo:.3f}, {hhi:.3f}]"
    else:
        hall = "hallucination n/a (nothing answered)"
    una = (f"unanswerable→IDK {m['unanswerable_abstention_rate']:.3f}  " if m.get("n_unanswerable", 1)
           else "")
    return (f"accuracy {m['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]  abstention {m['abstention_rate']:.3f}  "
            f"{hall}  {una}reward {m['reward']:.3f}")


def _run(a) -> int:
    import os
    import sys

    from glm5.rl.manager import RolloutStalledError
    from glm5.rl.runner import run_rl
    from glm5.train.interrupt import Interrupted

    cfg = config_from_args(a)
    try:
        s = run_rl(cfg)
    except RolloutStalledError as e:  # the run's data went bad (see the message), not a bug: one line
        if os.environ.get("GLM5_DEBUG"):
            raise
        print(f"glm5 rl: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # the first SIGINT / SIGTERM: the step finished and was checkpointed
        print(e.message, file=sys.stderr)
        return e.exit_code
    if s.get("nothing_to_train"):  # run_rl printed why
        return 0
    r = s["run"]
    if s.get("resumed_from"):
        print(f"resumed from {s['resumed_from']}")
    print(f"mode {r['mode']}: {r['steps']} steps in {r['elapsed_s']:.1f}s, {r['samples_per_s']:.2f} trained samples/s, "
          f"trainer idle {100 * r['trainer_idle_frac']:.0f}%, dropped stale groups "
          f"{r['buffer']['dropped_stale_groups']}, staleness {r['buffer']['staleness_hist']}")
    if "before" in s:
        print("before:", _fmt(s.get("before")))
    if "after" in s:
        print("after: ", _fmt(s.get("after")))
    for tag in ("delta", "delta_sampled"):
        if tag in s:
            print(f"{tag}: ", json.dumps({k: (round(v, 4) if isinstance(v, float) else
                                              [round(x, 4) for x in v] if isinstance(v, list) else v)
                                          for k, v in s[tag].items()}))
    print(f"metrics: {cfg.out}/metrics.jsonl  plot: {s.get('plot')}  summary: {cfg.out}/summary.json"
          + (f"  model: {s['saved']}" if s.get("saved") else ""))
    return 0
