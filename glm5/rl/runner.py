"""``run_rl(RLConfig)``: the whole RL job, as ``glm5 rl`` runs it.

1. load the policy (checkpoint directory with its tokenizer), build train / held-out task sets (disjoint);
2. evaluate the policy on the held-out set (greedy; accuracy, abstention, hallucination with 95% intervals);
3. start the rollout side: its own process on our engine (default; weights through shared memory, or
   torch.distributed with ``weight_sync="dist"``), in-process (``colocate``), or a Ray actor (``ray``);
4. run the manager in the chosen mode for ``steps`` train steps; metrics stream to ``out/metrics.jsonl``; with
   ``save_every`` a resumable checkpoint every N steps in ``out/checkpoints``, from which a rerun continues
   (``glm5.rl.checkpoint``; the evaluation before RL is then taken from the checkpoint); a first SIGINT / SIGTERM
   ends the loop after its step with a checkpoint (``glm5.train.interrupt``; ``glm5 rl`` exits 130 / 143);
5. evaluate again, write ``out/summary.json`` (before, after, deltas with intervals, throughput), ``out/rl.png``
   and the trained policy to ``out/hf`` (loadable by ``GLM5ForCausalLM.from_pretrained`` and our engine).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from glm5.engine.kv_quant import resolve_kv_cache_dtype
from glm5.rl.buffer import DataBuffer
from glm5.rl.checkpoint import RLCheckpointer
from glm5.rl.evaluate import compare, evaluate_model
from glm5.rl.manager import ManagerConfig, RolloutManager
from glm5.rl.metrics import MetricsLogger, plot_metrics
from glm5.rl.rewards import load_reward_fn
from glm5.rl.rollout import RolloutConfig, build_rollout_engine
from glm5.rl.rollout_client import LocalRolloutClient, ProcessRolloutClient
from glm5.rl.rollout_pool import RolloutPool, launch_process_pool
from glm5.rl.rollout_tp import check_rollout_gpus
from glm5.rl.rollout_worker import WorkerSpec
from glm5.rl.tasks import build_messages, load_tasks, save_tasks, train_eval_split
from glm5.rl.tools import get_tools
from glm5.rl.trainer import RLTrainer, TrainerConfig
from glm5.rl.weight_sync import clone_model
from glm5.train.interrupt import GracefulStop, Interrupted

__all__ = ["RLConfig", "run_rl", "DEFAULT_TASKS"]

# single-digit a op b; no "/" (reasoning-gym's single-digit quotients are mostly unverifiable, see rl.tasks)
DEFAULT_TASKS = ("basic_arithmetic:min_terms=2,max_terms=2,min_digits=1,max_digits=1,operators=+|-|*,"
                 "allow_parentheses=false,allow_negation=false",)


@dataclass
class RLConfig:
    model: str
    out: str = "runs/rl"
    tasks: list = field(default_factory=lambda: list(DEFAULT_TASKS))
    tasks_file: str | None = None  # JSONL of tasks (overrides generation); eval set from eval_tasks_file
    eval_tasks_file: str | None = None  # JSONL of held-out tasks (with generated training tasks too)
    unanswerable_frac: float = 0.2
    n_train: int = 2000
    n_eval: int = 200
    seed: int = 0
    group_size: int = 8
    manager: ManagerConfig = field(default_factory=ManagerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    dynamic_sampling: bool = False
    partial_rollout: bool | None = None  # None: on in async mode
    placement: str = "process"  # "process" | "colocate" | "ray"
    weight_sync: str = "shm"  # "shm" | "dist" (process / ray placement)
    dist_backend: str = "gloo"
    rollout_workers: int = 1  # rollout engines (own processes / Ray actors), slime's rollout data parallelism
    rollout_tp: int = 1  # processes per rollout engine, each a tensor-parallel shard (glm5.rl.rollout_tp)
    rollout_threads: int | None = None  # per rollout worker
    train_threads: int | None = None
    device: str = "cpu"
    rollout_device: str = "cpu"
    max_num_seqs: int = 64
    max_model_len: int = 1024
    max_num_batched_tokens: int = 4096  # engine prefill budget per step (RL re-prefills after every weight push)
    rollout_spec_tokens: int = 0  # MTP drafts per rollout engine step (speculative rollouts; 0 = off)
    # pause drafting while more rollout sequences than this run (0 = never): drafts pay for a batch's long tail, not
    # for a full batch (benchmarks/rl.md §5); seeded rollouts keep their tokens (position-keyed noise)
    rollout_spec_disable_batch_size: int = 0
    # "fp8": rollouts read GLM-5's FP8 KV cache (more sequences per engine); the trainer's log-probs then differ a
    # little more from the rollout's, which the importance corrections (tis / ddis) are for
    rollout_kv_cache_dtype: str = "auto"
    # bytes of KV cache per rollout engine (None: room for max_num_seqs full sequences, within 90% of a GPU's free
    # memory): on a GPU shared with the trainer, what the engine may take back at each wake-up (slime's
    # --sglang-mem-fraction-static)
    rollout_kv_cache_memory: int | None = None
    eval_sampled: int = 0  # also evaluate sampled (T = rollout temperature) accuracy with this many samples per task
    eval_before: bool = True
    eval_after: bool = True
    eval_every: int = 0
    save: bool = True  # export the final policy to out/hf
    save_every: int = 0  # steps between resumable checkpoints in out/checkpoints (0: none; see glm5.rl.checkpoint)
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest checkpoint in out/checkpoints when there is one
    progress: bool = True
    ray_address: str | None = None
    ray_num_gpus: float = 0.0

    def __post_init__(self):
        if isinstance(self.manager, dict):
            self.manager = ManagerConfig(**self.manager)
        if isinstance(self.rollout, dict):
            self.rollout = RolloutConfig(**self.rollout)
        if isinstance(self.trainer, dict):
            self.trainer = TrainerConfig(**self.trainer)
        if self.placement not in ("process", "colocate", "ray"):
            raise ValueError("placement must be process, colocate or ray")
        if self.weight_sync not in ("shm", "dist"):
            raise ValueError("weight_sync must be shm or dist")
        if self.rollout_workers < 1:
            raise ValueError(f"rollout_workers must be >= 1, got {self.rollout_workers}")
        _check_rollout_tp(self)
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")
        if self.rollout_spec_tokens < 0 or self.rollout_spec_disable_batch_size < 0:
            raise ValueError(f"rollout_spec_tokens and rollout_spec_disable_batch_size must be >= 0, got "
                             f"{self.rollout_spec_tokens}, {self.rollout_spec_disable_batch_size}")
        resolve_kv_cache_dtype(self.rollout_kv_cache_dtype)  # a ValueError naming the choices
        if self.rollout_kv_cache_memory is not None and (isinstance(self.rollout_kv_cache_memory, bool) or not
                                                         isinstance(self.rollout_kv_cache_memory, int)
                                                         or self.rollout_kv_cache_memory <= 0):
            raise ValueError(f"rollout_kv_cache_memory must be a positive number of bytes, got "
                             f"{self.rollout_kv_cache_memory!r}")
        if self.rollout_workers > 1 and self.placement == "colocate":
            raise ValueError("placement 'colocate' runs one engine in the trainer's process; "
                             "several rollout workers need placement 'process' or 'ray'")
        if not 0.0 <= self.unanswerable_frac <= 1.0:
            raise ValueError(f"unanswerable_frac must be in [0, 1], got {self.unanswerable_frac}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if not self.tasks_file and self.n_train < 1:
            raise ValueError(f"n_train must be >= 1, got {self.n_train}")
        if self.n_eval < 0 or self.eval_every < 0 or self.eval_sampled < 0:
            raise ValueError(f"n_eval, eval_every and eval_sampled must be >= 0, got {self.n_eval}, "
                             f"{self.eval_every}, {self.eval_sampled}")
        ro = self.rollout
        if ro.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {ro.max_new_tokens}")
        if ro.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {ro.max_turns}")
        if ro.temperature < 0 or not 0.0 < ro.top_p <= 1.0:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {ro.temperature}, {ro.top_p}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        uses_rollout_logp = [name for name, on in (("--old-logp rollout", self.trainer.old_logp == "rollout"),
                                                   ("--loss ddis", self.trainer.loss.loss_type == "ddis"),
                                                   (f"--tis {self.trainer.loss.tis}", self.trainer.loss.tis is not None),
                                                   ("--is-mask", self.trainer.loss.is_mask)) if on]
        if ro.top_p < 1.0 and uses_rollout_logp:
            # the rollout reports log-probs of the nucleus-truncated, renormalised distribution it sampled from, the
            # trainer those of the whole softmax(z / T): every ratio against rollout log-probs would be off
            raise ValueError(f"{', '.join(uses_rollout_logp)} compare the trainer's log-probs with the rollout "
                             f"engine's, which with top_p {ro.top_p} are of the truncated distribution; use top_p 1 "
                             f"with these options")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["trainer"] = self.trainer.to_dict()
        return d


def _check_rollout_tp(cfg: RLConfig) -> None:
    """``rollout_tp``: a positive int, with a placement that starts processes we own (colocate runs the engine
    in the trainer's process; a Ray actor runs it in a thread and has no followers)."""
    tp = cfg.rollout_tp
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"rollout_tp must be a positive integer, got {tp!r}")
    if tp > 1 and cfg.placement != "process":
        raise ValueError(f"rollout_tp={tp} needs placement 'process' (a group of {tp} processes per rollout "
                         f"worker); placement {cfg.placement!r} runs each engine in a single process or thread")


def _threads(cfg: RLConfig) -> tuple[int, int]:
    """(trainer threads, threads per rollout process): the rollout processes (workers × tensor-parallel ranks)
    share their side's cores."""
    n = os.cpu_count() or 1
    w = cfg.rollout_workers * cfg.rollout_tp
    if cfg.placement == "colocate" or cfg.manager.mode == "sync":
        return cfg.train_threads or n, cfg.rollout_threads or max(1, n // w)  # the two sides take turns
    half = max(1, n // 2)
    return cfg.train_threads or half, cfg.rollout_threads or max(1, (n - half) // w)


def _engine_kwargs(cfg: RLConfig) -> dict:
    return {"max_num_seqs": cfg.max_num_seqs, "max_model_len": cfg.max_model_len,
            "max_num_batched_tokens": cfg.max_num_batched_tokens, "num_speculative_tokens": cfg.rollout_spec_tokens,
            "spec_disable_batch_size": cfg.rollout_spec_disable_batch_size, "kv_cache_dtype": cfg.rollout_kv_cache_dtype,
            "kv_cache_memory": cfg.rollout_kv_cache_memory}


def make_client(cfg: RLConfig, policy, tokenizer, rollout_threads: int):
    ek = _engine_kwargs(cfg)

    def make_prompt(task):
        tools = None
        if cfg.rollout.tools:
            from glm5.rl.tools import get_tools

            tools = [t.schema() for t in get_tools(cfg.rollout.tools)]
        return tokenizer.apply_chat_template(build_messages(task, cfg.rollout.system), tools=tools,
                                             add_generation_prompt=True, enable_thinking=cfg.rollout.enable_thinking,
                                             tokenize=True)

    if cfg.placement == "colocate":
        ro = build_rollout_engine(cfg.model, tokenizer=tokenizer, device=cfg.rollout_device, engine_kwargs=ek,
                                  cfg=copy.deepcopy(cfg.rollout), model=clone_model(policy))
        return LocalRolloutClient(ro)
    transport = cfg.weight_sync if cfg.placement == "process" else "dist"
    if cfg.placement == "process":  # Ray places its actors on GPUs itself
        check_rollout_gpus(cfg.rollout_device, cfg.rollout_workers, cfg.rollout_tp)

    def spec():
        dist = {}
        if transport == "dist":
            from glm5.rl.weight_sync import free_port

            # every tensor-parallel rank of a worker receives the weights (and keeps its slice)
            dist = {"host": "127.0.0.1", "port": free_port(), "rank": 1, "world_size": 1 + cfg.rollout_tp,
                    "backend": cfg.dist_backend}
        return WorkerSpec(cfg.model, cfg.rollout.to_dict(), ek, device=cfg.rollout_device, threads=rollout_threads,
                          weight_transport=transport, dist=dist, tp=cfg.rollout_tp)

    if cfg.placement == "ray":
        from glm5.rl.ray_launcher import RayRolloutClient

        def actor():  # each actor has its own two-rank weight group
            return RayRolloutClient(spec(), make_prompt=make_prompt, address=cfg.ray_address,
                                    num_gpus=cfg.ray_num_gpus)

        return actor() if cfg.rollout_workers == 1 else RolloutPool([actor() for _ in range(cfg.rollout_workers)])
    if cfg.rollout_workers > 1:
        return launch_process_pool(spec(), cfg.rollout_workers, policy, make_prompt=make_prompt)
    return ProcessRolloutClient(spec(), policy, make_prompt=make_prompt)


def oversubscription_warning(cfg: RLConfig, train_threads: int, rollout_threads: int) -> str | None:
    """Rollout workers and the trainer that run at once on the CPU need more threads than it has cores: each
    gets a slice, and OpenMP threads that spin while descheduled make that much worse."""
    cores = os.cpu_count() or 1
    if cfg.placement == "colocate" or "cpu" not in (cfg.device, cfg.rollout_device):
        return None
    need = cfg.rollout_workers * cfg.rollout_tp * rollout_threads * (cfg.rollout_device == "cpu")
    if cfg.manager.mode != "sync":  # sync: the trainer runs while the rollout side waits
        need += train_threads * (cfg.device == "cpu")
    if need <= cores:
        return None
    tp = f" × {cfg.rollout_tp} tensor-parallel ranks" if cfg.rollout_tp > 1 else ""
    return (f"{cfg.rollout_workers} rollout worker(s){tp} × {rollout_threads} thread(s) and a trainer with "
            f"{train_threads} want {need} threads on {cores} CPU cores; expect contention (set "
            "OMP_WAIT_POLICY=PASSIVE, or lower --rollout-workers / --rollout-threads / --train-threads)")


def soft_policy_warning(greedy_accuracy: float | None, sampled_accuracy: float | None) -> str | None:
    """A warning when the policy's samples are far worse than its greedy answers (the rollout accuracy of the
    first RL steps, >= 64 answerable samples, against the greedy held-out accuracy before RL). Outcome-reward
    RL from such a soft policy mostly pushes down broken samples and lowered glm5-tiny's accuracy
    (benchmarks/speedrun.md); train SFT longer first, or lower the RL learning rate."""
    if greedy_accuracy is None or sampled_accuracy is None or greedy_accuracy < 0.2:
        return None
    if sampled_accuracy >= 0.5 * greedy_accuracy:
        return None
    return (f"the policy's samples are right {sampled_accuracy:.0%} of the time against {greedy_accuracy:.0%} "
            "greedy: RL from so soft a policy tends to lower accuracy; consider more SFT or a smaller lr")


def nothing_to_train(cfg: RLConfig, saved_step: int) -> str | None:
    """The line for a rerun whose checkpoint holds ``saved_step`` steps when there is nothing left to do, else
    None: the checkpoint is past ``--steps``, or at it with ``summary.json`` recording the run as finished there
    (with its export, if one is asked for). A run stopped after its last step (interrupted, or killed before its
    final evaluation and export) is at ``--steps`` but not finished: its rerun still evaluates and exports."""
    steps, out = cfg.manager.num_steps, Path(cfg.out)
    prev = _read_summary(out)
    finished = (prev.get("steps_done") or -1) >= saved_step and (not cfg.save or bool(prev.get("saved")))
    if saved_step > steps or (saved_step == steps and finished):
        return (f"{out} already holds step {saved_step} >= --steps {steps}: nothing to train; raise --steps, or "
                f"pass --no-resume / a new --out")
    return None


def _read_summary(out: Path) -> dict:
    try:
        return json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def run_rl(cfg: RLConfig, handle_signals: bool = True) -> dict:
    """The whole job (see the module docstring); returns the summary. ``handle_signals``: a first SIGINT / SIGTERM
    during the RL loop ends it after the step in progress, saves a checkpoint (whatever ``save_every`` is), stops
    the rollout process(es) and raises :class:`glm5.train.interrupt.Interrupted`; a rerun resumes from it. A rerun
    with nothing left to train returns at once (its summary's ``nothing_to_train`` is the line, also printed)."""
    from glm5.model.transformer import GLM5ForCausalLM
    from glm5.tokenizer import GLM5Tokenizer

    # what the rollout side would only find out after it started (in its own process): check it here, first
    if not Path(cfg.model).is_dir():
        raise ValueError(f"model {cfg.model!r}: no such directory (a checkpoint: config.json, safetensors, tokenizer)")
    load_reward_fn(cfg.rollout.reward)
    get_tools(cfg.rollout.tools)
    if cfg.tasks_file:
        train_tasks = load_tasks(cfg.tasks_file)
        held = load_tasks(cfg.eval_tasks_file) if cfg.eval_tasks_file else []
    else:
        train_tasks, held = train_eval_split(cfg.tasks, cfg.n_train, cfg.n_eval, cfg.seed, cfg.unanswerable_frac)
        if cfg.eval_tasks_file:  # the user's held-out set replaces the generated one (it was silently ignored)
            held = load_tasks(cfg.eval_tasks_file)
    out = Path(cfg.out)
    ckpt = RLCheckpointer(cfg)
    resume_from = ckpt.latest() if cfg.resume else None
    saved = ckpt.check(resume_from) if resume_from is not None else None  # another run's checkpoint: refused here
    note = nothing_to_train(cfg, saved["step"]) if saved is not None else None
    if note:
        print(note, file=sys.stderr)
        return {**_read_summary(out), "nothing_to_train": note, "resumed_from": str(resume_from)}
    out.mkdir(parents=True, exist_ok=True)
    train_threads, rollout_threads = _threads(cfg)
    warn = oversubscription_warning(cfg, train_threads, rollout_threads)
    if warn:
        warnings.warn(warn, stacklevel=2)
    torch.set_num_threads(train_threads)
    torch.manual_seed(cfg.seed)
    tok = GLM5Tokenizer.from_pretrained(cfg.model)
    policy = GLM5ForCausalLM.from_pretrained(cfg.model, dtype=torch.float32, device=cfg.device)
    if cfg.rollout_spec_tokens and policy.model.mtp is None:
        raise ValueError("rollout_spec_tokens > 0 drafts with the MTP layer, and this model has none")
    if cfg.rollout_tp > 1:  # here, not as a traceback from inside the rollout processes
        from glm5.model.tensor_parallel import check_divisible

        try:
            check_divisible(policy.config, cfg.rollout_tp)
        except ValueError as e:
            raise ValueError(f"rollout_tp={cfg.rollout_tp}: {e}") from None
    save_tasks(train_tasks, out / "train_tasks.jsonl")
    save_tasks(held, out / "eval_tasks.jsonl")
    (out / "rl_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")
    ek = _engine_kwargs(cfg)
    summary: dict = {"config": cfg.to_dict()}
    def evaluate_all(tag: str) -> None:
        t = time.perf_counter()
        summary[tag] = evaluate_model(policy, tok, held, rollout=cfg.rollout, engine_kwargs=ek)
        summary[tag]["eval_s"] = time.perf_counter() - t
        if cfg.eval_sampled:
            summary[tag + "_sampled"] = evaluate_model(policy, tok, held, rollout=cfg.rollout, engine_kwargs=ek,
                                                       temperature=cfg.rollout.temperature or 1.0,
                                                       samples=cfg.eval_sampled, seed=cfg.seed + 99)

    if not cfg.resume and ckpt.clear():
        warnings.warn(f"--no-resume: removing the earlier run's checkpoints in {ckpt.dir}", stacklevel=2)
    if cfg.eval_before and held and resume_from is None:  # when resuming, the checkpoint holds the starting policy's
        evaluate_all("before")
    if cfg.rollout.temperature > 0:
        cfg.trainer.temperature = cfg.rollout.temperature
    # before any checkpoint is loaded: the KL reference is a copy of the starting policy
    trainer = RLTrainer(policy, cfg.trainer, total_steps=cfg.manager.num_steps)
    client = make_client(cfg, policy, tok, rollout_threads)
    partial = cfg.partial_rollout if cfg.partial_rollout is not None else cfg.manager.mode == "async"
    buffer = DataBuffer(train_tasks, client.make_prompt, cfg.group_size, cfg.rollout.max_new_tokens, seed=cfg.seed,
                        tau=cfg.manager.tau, dynamic_sampling=cfg.dynamic_sampling, partial_rollout=partial)
    evals, start = [], 0
    early = {"correct": 0, "answerable": 0, "checked": False}  # sampled accuracy over the first steps
    if resume_from is not None:
        try:
            state = ckpt.resume(resume_from, trainer, buffer)
            client.update_weights(policy, trainer.version)  # the rollout side starts from the checkpoint's policy
        except BaseException:
            client.close()
            raise
        start, evals = state["step"], state.get("evals") or []
        summary.update({k: state[k] for k in ("before", "before_sampled") if state.get(k) is not None})
        summary["resumed_from"], early["checked"] = state["path"], True
    logger = MetricsLogger(out, cfg.manager.num_steps, progress=cfg.progress, start_step=start)
    # the evaluations so far: none, or the checkpoint's (not any made after it by the run that was stopped)
    (out / "eval.jsonl").write_text("".join(json.dumps(m) + "\n" for m in evals))

    def on_step(step, rec):
        # one step holds only a few prompts (4 groups in the cpu speedrun), so judge the policy's softness on
        # the first >= 64 answerable samples rather than on step 0 alone
        if not early["checked"] and "before" in summary and rec.get("n_answerable") is not None:
            early["correct"] += int(rec.get("correct", 0))
            early["answerable"] += int(rec["n_answerable"])
            if early["answerable"] >= 64 or step + 1 >= cfg.manager.num_steps:
                early["checked"] = True
                sampled = early["correct"] / early["answerable"] if early["answerable"] else None
                warn = soft_policy_warning(summary["before"].get("accuracy"), sampled)
                if warn:
                    warnings.warn(warn, stacklevel=1)
                    summary["soft_policy_warning"] = warn
        if cfg.eval_every and held and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.manager.num_steps:
            m = evaluate_model(policy, tok, held, rollout=cfg.rollout, engine_kwargs=ek)
            m["step"] = step + 1
            evals.append(m)
            with open(out / "eval.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
        progress["done"] = step + 1
        last = step + 1 == cfg.manager.num_steps
        # a resumed run (e.g. after an interrupt) ends with a checkpoint even without save_every: its rerun then
        # finds it finished instead of training again from the older checkpoint
        if (cfg.save_every and ((step + 1) % cfg.save_every == 0 or last)) or (last and resume_from is not None):
            save(step + 1)

    def save(steps_done: int) -> Path:
        progress["saved"] = steps_done
        return ckpt.save(steps_done, trainer, buffer, {"before": summary.get("before"),
                                                      "before_sampled": summary.get("before_sampled"), "evals": evals})

    progress = {"done": start, "saved": start if resume_from is not None else None}
    stop = GracefulStop() if handle_signals else None
    mgr = RolloutManager(client, trainer, buffer, cfg.manager, logger, on_step=on_step,
                         should_stop=(lambda: stop.signum is not None) if stop is not None else None)
    interrupted = None
    with stop if stop is not None else contextlib.nullcontext():
        try:
            summary["run"] = mgr.run(start_step=start)
            if stop is not None and stop.signum is not None:  # after a step (or during the last one)
                done = progress["done"]
                path = save(done) if progress["saved"] != done else ckpt.dir / f"step_{done:08d}"
                interrupted = Interrupted(stop.signum, done, path)
            else:
                try:
                    summary["rollout_stats"] = client.stats()
                except Exception:
                    pass
        finally:
            client.close()  # the rollout process(es) stop here, also when interrupted
            logger.close()
    if interrupted is not None:
        raise interrupted
    if cfg.eval_after and held:
        evaluate_all("after")
        if "before" in summary:
            summary["delta"] = compare(summary["before"], summary["after"])
        if "before_sampled" in summary:
            summary["delta_sampled"] = compare(summary["before_sampled"], summary["after_sampled"])
    summary["evals"] = evals
    summary["steps_done"] = progress["done"]  # a rerun with nothing left to train finds them here
    if cfg.save:
        from glm5.train.checkpoint import export_hf

        export_hf(policy, out / "hf", tokenizer=tok)
        summary["saved"] = str(out / "hf")
    logger.write_json("summary.json", summary)
    png = plot_metrics(out / "metrics.jsonl", out / "rl.png", title=f"glm5 rl ({cfg.manager.mode})")
    summary["plot"] = str(png) if png else None
    return summary
