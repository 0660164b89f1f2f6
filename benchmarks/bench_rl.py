"""RL benchmarks and the acceptance experiment (CPU).

    python3 benchmarks/bench_rl.py all          --out runs/bench_rl     # everything below, in order
    python3 benchmarks/bench_rl.py sft          --out runs/bench_rl     # data + tokenizer + SFT policy
    python3 benchmarks/bench_rl.py accept       --out runs/bench_rl     # RL with the abstention reward, before/after
    python3 benchmarks/bench_rl.py throughput   --out runs/bench_rl     # sync vs one-step-off vs async samples/s

1. **Policy.** A glm5-nano-shaped model (MLA + DSA + MoE + MTP) is SFT'd from scratch with our trainer
   (``glm5.train.Trainer``, mode "sft", Muon + AdamW) on generated conversations: two-term arithmetic from
   reasoning-gym (1–2 digit operands, + − ×; answer after ``</think>`` with a one-line reasoning, no worked
   digits, so difficulty grows with the operands) and unanswerable questions answered "I don't know.". The
   tokenizer is a byte-level BPE trained on the same text.
2. **Acceptance.** ``run_rl`` on that checkpoint (async mode, τ = 2, GRPO advantages, PPO clip-higher 0.2/0.28,
   abstention reward +1 / 0 / −1, unanswerable questions in the mix); held-out tasks (disjoint from RL train and
   SFT questions) evaluated greedily before and after, with 95% intervals.
3. **Throughput.** The same model, task set and batch shape run in sync, one-step-off and async mode, in the
   same process, repeated and interleaved; trained samples per second of wall time.

Everything lands in ``--out`` (JSON per stage, metrics.jsonl and plots of each run); ``results.json`` collects
the headline numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glm5.rl.tasks import make_task_set, save_tasks, unanswerable_questions  # noqa: E402

ARITH = ("basic_arithmetic:min_terms=2,max_terms=2,min_digits=1,max_digits=2,operators=+|-|*,"
         "allow_parentheses=false,allow_negation=false")
IDK_REASONS = ["The question does not give the information needed to answer it.",
               "Something essential is missing from the question, so it cannot be worked out.",
               "There is no way to determine this from what is given."]


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# --------------------------------------------------------------------------------------------- data
def sft_conversations(n: int, seed: int, idk_frac: float) -> list[dict]:
    rng = random.Random(seed)
    tasks = make_task_set([ARITH], n, seed=seed, unanswerable_frac=0.0)
    n_idk = int(n * idk_frac)
    convs = []
    for t in tasks[: n - n_idk]:
        q = t["question"]
        expr = q.removeprefix("Calculate ").rstrip(".")
        convs.append({"messages": [{"role": "user", "content": q},
                                   {"role": "assistant", "reasoning_content": f"I work out {expr}.",
                                    "content": t["answer"]}]})
    for t in unanswerable_questions(n_idk, seed=seed + 1):
        convs.append({"messages": [{"role": "user", "content": t["question"]},
                                   {"role": "assistant", "reasoning_content": rng.choice(IDK_REASONS),
                                    "content": "I don't know."}]})
    rng.shuffle(convs)
    return convs


def stage_sft(a) -> dict:
    from glm5.tokenizer import train_bpe
    from glm5.train.config import TrainConfig
    from glm5.train.trainer import train

    out = Path(a.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    convs = sft_conversations(a.sft_examples, seed=100, idk_frac=a.sft_idk_frac)
    with open(out / "data" / "sft.jsonl", "w") as f:
        for c in convs:
            f.write(json.dumps(c) + "\n")
    texts = [m["content"] + " " + m.get("reasoning_content", "") for c in convs for m in c["messages"]]
    tok = train_bpe(texts, vocab_size=a.vocab)
    tok.save_pretrained(out / "tokenizer")
    log(f"SFT data: {len(convs)} conversations, tokenizer {tok.vocab_size} ids")
    t0 = time.time()
    cfg = TrainConfig(mode="sft", preset="glm5-nano", model_overrides={"vocab_size": tok.vocab_size,
                                                                       "index_topk": 64},
                      data=[str(out / "data" / "sft.jsonl")], tokenizer=str(out / "tokenizer"),
                      cache_dir=str(out / "cache"), out=str(out / "sft"), seq_len=64, batch_size=a.sft_batch,
                      max_steps=a.sft_steps, max_minutes=a.sft_minutes, lr=a.sft_lr, warmup_steps=50,
                      dsa="sparse", threads=a.threads, eval_every=max(50, a.sft_steps // 10), eval_batches=8,
                      ckpt_every=10 ** 9, progress=False, resume=False, seed=0)
    res = train(cfg)
    res = {k: v for k, v in res.items() if isinstance(v, (int, float, str, list, dict, type(None)))}
    res["wall_s"] = time.time() - t0
    (out / "sft.json").write_text(json.dumps(res, indent=2, default=str))
    log(f"SFT done in {res['wall_s']:.0f}s: {json.dumps({k: res[k] for k in res if 'loss' in k})[:300]}")
    return res


# --------------------------------------------------------------------------------------- RL runs
def task_files(a) -> tuple[str, str]:
    """RL train tasks and held-out tasks; held-out questions never occur in the RL train set or the SFT data."""
    from glm5.rl.tasks import train_eval_split

    d = Path(a.out) / "data"
    tr, ev = d / "rl_train.jsonl", d / "rl_eval.jsonl"
    if not tr.exists():
        sft_q = {json.loads(line)["messages"][0]["content"] for line in open(d / "sft.jsonl")}
        train, held = train_eval_split([ARITH], a.rl_train_tasks, 3 * a.eval_tasks, seed=1,
                                       unanswerable_frac=a.unanswerable_frac)
        held = [t for t in held if t["question"] not in sft_q][: a.eval_tasks]
        save_tasks(train, tr)
        save_tasks(held, ev)
        log(f"RL tasks: {len(train)} train, {len(held)} held-out "
            f"({sum(not t['answerable'] for t in held)} unanswerable)")
    return str(tr), str(ev)


def rl_config(a, out: str, mode: str, steps: int, *, eval_: bool, reward: str = "abstention", seed: int = 0,
              n_eval: int | None = None, threads: int | None = None, placement: str = "process"):
    from glm5.rl.runner import RLConfig

    train_file, eval_file = task_files(a)
    return RLConfig(
        model=str(Path(a.out) / "sft" / "hf"), out=out, tasks=[ARITH], unanswerable_frac=a.unanswerable_frac,
        tasks_file=train_file, eval_tasks_file=eval_file if eval_ else None,
        n_train=a.rl_train_tasks, n_eval=n_eval if n_eval is not None else a.eval_tasks, seed=seed,
        group_size=a.group_size,
        manager={"mode": mode, "num_steps": steps, "groups_per_step": a.groups,
                 "tau": a.tau if mode == "async" else None, "max_inflight_groups": a.inflight_groups},
        rollout={"max_new_tokens": a.max_new_tokens, "reward": reward, "temperature": 1.0},
        trainer={"lr": a.rl_lr, "optimizer": "adamw", "loss": {"eps_low": 0.2, "eps_high": 0.28}},
        placement=placement, max_num_seqs=max(64, a.inflight_groups * a.group_size), max_model_len=256,
        eval_before=eval_, eval_after=eval_, save=eval_, progress=False,
        train_threads=threads or a.threads, rollout_threads=threads or a.threads)


def stage_accept(a) -> dict:
    from glm5.rl.runner import run_rl

    results = {}
    for reward in a.rewards.split(","):
        out = str(Path(a.out) / f"accept_{reward}")
        log(f"acceptance run: reward={reward}, {a.rl_steps} async steps")
        t0 = time.time()
        s = run_rl(rl_config(a, out, "async", a.rl_steps, eval_=True, reward=reward, seed=1))
        keep = {k: s.get(k) for k in ("before", "after", "delta")}
        keep["run"] = {k: v for k, v in s["run"].items() if k != "buffer"}
        keep["run"]["staleness_hist"] = s["run"]["buffer"]["staleness_hist"]
        keep["run"]["dropped_stale_groups"] = s["run"]["buffer"]["dropped_stale_groups"]
        keep["wall_s"] = time.time() - t0
        results[reward] = keep
        b, f = s["before"], s["after"]
        log(f"  accuracy {b['accuracy']:.3f} -> {f['accuracy']:.3f}   hallucination {b['hallucination_rate']:.3f} -> "
            f"{f['hallucination_rate']:.3f}   abstention {b['abstention_rate']:.3f} -> {f['abstention_rate']:.3f}   "
            f"unanswerable->IDK {b['unanswerable_abstention_rate']:.3f} -> {f['unanswerable_abstention_rate']:.3f}")
    (Path(a.out) / "accept.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def stage_throughput(a) -> dict:
    from glm5.rl.runner import run_rl

    runs: dict[str, list] = {}
    plan = [(m, p, th) for m, p, th in (("sync", "colocate", 2), ("sync", "process", 1), ("one-step-off", "process", 1),
                                       ("async", "process", 1))]
    for rep in range(a.repeats):
        for mode, placement, threads in plan:
            key = f"{mode}/{placement}/{threads}t"
            out = str(Path(a.out) / "throughput" / f"{mode}_{placement}_{threads}t_r{rep}")
            s = run_rl(rl_config(a, out, mode, a.tp_steps, eval_=False, seed=10 + rep, n_eval=0, threads=threads,
                                 placement=placement))
            r = s["run"]
            rec = {"samples_per_s": r["samples_per_s"], "elapsed_s": r["elapsed_s"],
                   "trainer_idle_frac": r["trainer_idle_frac"], "generated_samples_per_s": r["generated_samples_per_s"],
                   "staleness_hist": r["buffer"]["staleness_hist"], "load_avg": os.getloadavg()[0]}
            runs.setdefault(key, []).append(rec)
            log(f"  {key} rep {rep}: {r['samples_per_s']:.2f} samples/s, idle {100 * r['trainer_idle_frac']:.0f}%, "
                f"load {rec['load_avg']:.1f}")
    med = {k: statistics.median(x["samples_per_s"] for x in v) for k, v in runs.items()}
    best_sync = max(v for k, v in med.items() if k.startswith("sync"))
    res = {"runs": runs, "median_samples_per_s": med, "async_over_best_sync": med["async/process/1t"] / best_sync,
           "one_step_off_over_best_sync": med["one-step-off/process/1t"] / best_sync}
    (Path(a.out) / "throughput.json").write_text(json.dumps(res, indent=2))
    log(f"median samples/s: {json.dumps({k: round(v, 2) for k, v in med.items()})}; "
        f"async / best sync = {res['async_over_best_sync']:.2f}x")
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["all", "sft", "accept", "throughput"])
    p.add_argument("--out", default="runs/bench_rl")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--sft-examples", type=int, default=8000)
    p.add_argument("--sft-idk-frac", type=float, default=0.1)
    p.add_argument("--sft-steps", type=int, default=1500)
    p.add_argument("--sft-minutes", type=float, default=25.0)
    p.add_argument("--sft-batch", type=int, default=32)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--rl-steps", type=int, default=60)
    p.add_argument("--rl-lr", type=float, default=2e-4)
    p.add_argument("--rl-train-tasks", type=int, default=3000)
    p.add_argument("--eval-tasks", type=int, default=600)
    p.add_argument("--unanswerable-frac", type=float, default=0.2)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--inflight-groups", type=int, default=16)
    p.add_argument("--tau", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rewards", default="abstention")
    p.add_argument("--tp-steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    results_path = Path(a.out) / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if a.stage in ("all", "sft"):
        results["sft"] = stage_sft(a)
    if a.stage in ("all", "accept"):
        results["accept"] = stage_accept(a)
    if a.stage in ("all", "throughput"):
        results["throughput"] = stage_throughput(a)
    results_path.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
