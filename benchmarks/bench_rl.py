"""RL benchmarks and the acceptance experiment (CPU).

    python3 benchmarks/bench_rl.py all          --out runs/bench_rl     # everything below, in order
    python3 benchmarks/bench_rl.py sft          --out runs/bench_rl     # data + tokenizer + SFT policy
    python3 benchmarks/bench_rl.py accept       --out runs/bench_rl     # RL with the abstention reward, before/after
    python3 benchmarks/bench_rl.py throughput   --out runs/bench_rl     # sync vs one-step-off vs async samples/s
    python3 benchmarks/bench_rl.py specpause    --out runs/bench_rl     # seeded speculative rollouts, drafts paused above N

1. **Policy.** A glm5-nano-shaped model (MLA + DSA + MoE + MTP) is SFT'd from scratch with our trainer
   (``glm5.train.Trainer``, mode "sft", Muon + AdamW) on generated conversations: two-term arithmetic from
   reasoning-gym (1–2 digit operands, + − ×; answer after ``</think>`` with a one-line reasoning, no worked
   digits, so difficulty grows with the operands), unanswerable questions answered "I don't know.", and a few
   products far beyond the model (3–4 digits × 2–3 digits, never in the RL sets) also answered "I don't know.".
   The tokenizer is a byte-level BPE trained on the same text.
2. **Acceptance.** ``run_rl`` on that checkpoint (async mode, τ = 2, GRPO advantages, PPO clip-higher 0.2/0.28,
   abstention reward +1 / 0 / −1, unanswerable questions in the mix); held-out tasks (disjoint from RL train and
   SFT questions) evaluated greedily before and after, with 95% intervals.
3. **Throughput.** The same model, task set and batch shape run in sync, one-step-off and async mode, in the
   same process, repeated and interleaved; trained samples per second of wall time.
4. **Speculative rollouts paused above N** (``specpause``, not part of ``all``). One rollout batch as §5 of
   benchmarks/rl.md runs it (``--spec-groups`` groups × ``--group-size`` samples of the RL train tasks, T = 1, seeded
   per sample as ``glm5 rl`` seeds them, ``--spec-max-new-tokens`` tokens, max_model_len 256), through one rollout
   engine per mode in one process: plain decoding, ``--spec-tokens`` drafts at every step, and drafts paused while
   more than N (``--spec-pause``) sequences run. Process CPU time per mode, interleaved, best of ``--repeats``, each
   run on a fresh prefix cache; the samples of every mode must be token-identical (seeded tokens do not depend on
   speculation). ``--spec-model random`` runs a randomly initialised policy of the same shape instead of the SFT one
   (the cost of each mode without the SFT run; its responses are longer).

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
HARD_REASONS = ["These numbers are too large for me to multiply reliably.",
                "I cannot multiply numbers this large without making mistakes."]


def _digits(n: int) -> list[int]:
    return [int(c) for c in str(n)][::-1]  # ones first


PLACES = ["ones", "tens", "hundreds"]


def _carry_columns(pairs: list[tuple[int, int]], sym: str, combine) -> list[str]:
    """Column steps with a carry (addition, multiplication by one digit): pairs (x, y) ones first."""
    steps, carry = [], 0
    for i, (x, y) in enumerate(pairs):
        t = combine(x, y) + carry
        expr = f"{x}{sym}{y}" + (f"+{carry}" if carry else "")
        carry = t // 10
        steps.append(f"{PLACES[i]} {expr}={t}" + (f", write {t % 10} carry {carry}" if carry else ""))
    if carry:
        steps.append(f"write the carry {carry}")
    return steps


def column_add(a: int, b: int) -> list[str]:
    da, db = _digits(a), _digits(b)
    n = max(len(da), len(db))
    return _carry_columns([(da[i] if i < len(da) else 0, db[i] if i < len(db) else 0) for i in range(n)], "+",
                          lambda x, y: x + y)


def column_sub(a: int, b: int) -> list[str]:
    """a >= b >= 0."""
    da, db = _digits(a), _digits(b)
    steps, borrow = [], 0
    for i in range(len(da)):
        x, y = da[i] - borrow, (db[i] if i < len(db) else 0)
        if x < y:
            steps.append(f"{PLACES[i]} {x}-{y} needs a borrow: {x + 10}-{y}={x + 10 - y}")
            borrow = 1
        else:
            steps.append(f"{PLACES[i]} {x}-{y}={x - y}")
            borrow = 0
    return steps


def column_mul(a: int, d: int) -> list[str]:
    """a × one digit d."""
    return _carry_columns([(x, d) for x in _digits(a)], "*", lambda x, y: x * y)


def worked(a: int, op: str, b: int) -> str | None:
    """Column-arithmetic reasoning for a op b (operands < 100), or None where we write none (2-digit × 2-digit)."""
    if op == "+":
        steps = column_add(a, b)
    elif op == "-":
        steps = column_sub(a, b) if a >= b else [f"{b} is larger, so the result is -({b}-{a})"] + column_sub(b, a)
    elif op == "*":
        if b < 10:
            steps = column_mul(a, b)
        elif a < 10:
            steps = [f"swap to {b}*{a}"] + column_mul(b, a)
        else:
            return None
    else:
        return None
    return "; ".join(steps) + f". So {a} {op} {b} = {eval(f'{a}{op}{b}')}."


def sft_conversations(n: int, seed: int, idk_frac: float, hard_frac: float, cot_frac: float) -> list[dict]:
    """Answerable two-term arithmetic in two styles, unanswerable questions and out-of-reach products.

    * "worked" (``cot_frac`` of the answerable ones, where a column method applies): digit-by-digit reasoning;
    * "direct": a one-line reasoning and the answer, so the model must compute it in one go (unreliable beyond
      one digit) — the SFT policy mixes both styles, and RL can learn which one pays;
    * unanswerable questions and products of 3–4 digit by 2–3 digit numbers (never in the RL sets) answered
      "I don't know." — the abstention prior RL can extend to answerable questions the policy gets wrong."""
    rng = random.Random(seed)
    tasks = make_task_set([ARITH], n, seed=seed, unanswerable_frac=0.0)
    n_idk, n_hard = int(n * idk_frac), int(n * hard_frac)
    convs = []

    def conv(q, reasoning, answer):
        return {"messages": [{"role": "user", "content": q},
                             {"role": "assistant", "reasoning_content": reasoning, "content": answer}]}

    for _ in range(n_hard):
        q = f"Calculate {rng.randint(100, 9999)} * {rng.randint(10, 999)}."
        convs.append(conv(q, rng.choice(HARD_REASONS), "I don't know."))
    for t in tasks[: n - n_idk - n_hard]:
        a, op, b = t["question"].removeprefix("Calculate ").rstrip(".").split()
        w = worked(int(a), op, int(b))
        if w is not None and rng.random() < cot_frac:
            convs.append(conv(t["question"], w, t["answer"]))
        else:
            convs.append(conv(t["question"], f"I work out {a} {op} {b}.", t["answer"]))
    for t in unanswerable_questions(n_idk, seed=seed + 1):
        convs.append(conv(t["question"], rng.choice(IDK_REASONS), "I don't know."))
    rng.shuffle(convs)
    return convs


def sft_data(a):
    """The SFT conversations (data/sft.jsonl) and the BPE tokenizer trained on them -> the tokenizer."""
    from glm5.tokenizer import train_bpe

    out = Path(a.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    convs = sft_conversations(a.sft_examples, seed=100, idk_frac=a.sft_idk_frac, hard_frac=a.sft_hard_frac,
                              cot_frac=a.sft_cot_frac)
    with open(out / "data" / "sft.jsonl", "w") as f:
        for c in convs:
            f.write(json.dumps(c) + "\n")
    texts = [m["content"] + " " + m.get("reasoning_content", "") for c in convs for m in c["messages"]]
    tok = train_bpe(texts, vocab_size=a.vocab)
    tok.save_pretrained(out / "tokenizer")
    log(f"SFT data: {len(convs)} conversations, tokenizer {tok.vocab_size} ids")
    return tok


def policy_config(vocab_size: int):
    """The policy's shape: glm5-nano with the tokenizer's vocabulary and a DSA top-k past the rollout lengths."""
    from glm5.config import preset

    return preset("glm5-nano", vocab_size=vocab_size, index_topk=128)


def stage_sft(a) -> dict:
    from glm5.train.config import TrainConfig
    from glm5.train.trainer import train

    out = Path(a.out)
    tok = sft_data(a)
    t0 = time.time()
    shape = policy_config(tok.vocab_size)
    cfg = TrainConfig(mode="sft", preset="glm5-nano", model_overrides={"vocab_size": shape.vocab_size,
                                                                       "index_topk": shape.index_topk},
                      data=[str(out / "data" / "sft.jsonl")], tokenizer=str(out / "tokenizer"),
                      cache_dir=str(out / "cache"), out=str(out / "sft"), seq_len=a.sft_seq_len, batch_size=a.sft_batch,
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
def sft_questions(a) -> set:
    return {json.loads(line)["messages"][0]["content"] for line in open(Path(a.out) / "data" / "sft.jsonl")}


def task_files(a) -> tuple[str, str]:
    """RL train tasks and held-out tasks (disjoint: no held-out question occurs in the RL train set). Held-out
    questions that happen to occur in the SFT data are kept (the arithmetic space is small) and reported
    separately (``unseen`` subset)."""
    from glm5.rl.tasks import train_eval_split

    d = Path(a.out) / "data"
    tr, ev = d / "rl_train.jsonl", d / "rl_eval.jsonl"
    if not tr.exists():
        train, held = train_eval_split([ARITH], a.rl_train_tasks, a.eval_tasks, seed=1,
                                       unanswerable_frac=a.unanswerable_frac)
        save_tasks(train, tr)
        save_tasks(held, ev)
        seen = sft_questions(a)
        log(f"RL tasks: {len(train)} train, {len(held)} held-out ({sum(not t['answerable'] for t in held)} "
            f"unanswerable, {sum(t['question'] not in seen for t in held)} never seen in SFT)")
    return str(tr), str(ev)


def subset_delta(a, before: dict, after: dict) -> dict:
    """Before/after on the held-out questions that are not in the SFT data either."""
    from glm5.rl.evaluate import compare

    from glm5.rl.tasks import load_tasks

    seen = sft_questions(a)
    held = load_tasks(task_files(a)[1])
    idx = [i for i, t in enumerate(held) if t["question"] not in seen]

    def sub(m):
        pt = {k: [v[i] for i in idx] for k, v in m["per_task"].items()}
        k = m.get("samples_per_task", 1)
        ans = [i for i, x in enumerate(pt["answerable"]) if x]
        answered = sum(pt["answered"])
        return {"per_task": pt, "samples_per_task": k, "n": len(idx),
                "accuracy": sum(pt["correct"][i] for i in ans) / max(1, k * len(ans)),
                "hallucination_rate": sum(pt["wrong"]) / answered if answered else 0.0}

    b, f = sub(before), sub(after)
    return {"n_tasks": len(idx), "before": {k: b[k] for k in ("accuracy", "hallucination_rate")},
            "after": {k: f[k] for k in ("accuracy", "hallucination_rate")}, "delta": compare(b, f)}


def rl_config(a, out: str, mode: str, steps: int, *, eval_: bool, reward: str = "abstention", seed: int = 0,
              n_eval: int | None = None, threads: int | None = None, placement: str = "process"):
    from glm5.rl.runner import RLConfig

    train_file, eval_file = task_files(a)
    return RLConfig(
        model=str(Path(a.out) / "sft" / "hf"), out=out, tasks=[ARITH], unanswerable_frac=a.unanswerable_frac,
        tasks_file=train_file, eval_tasks_file=eval_file if eval_ else None,
        n_train=a.rl_train_tasks, n_eval=n_eval if n_eval is not None else a.eval_tasks, seed=seed,
        group_size=a.group_size, dynamic_sampling=a.dynamic_sampling, eval_sampled=a.eval_sampled if eval_ else 0,
        manager={"mode": mode, "num_steps": steps, "groups_per_step": a.groups,
                 "tau": a.tau if mode == "async" else None, "max_inflight_groups": a.inflight_groups},
        rollout={"max_new_tokens": a.max_new_tokens, "reward": reward, "temperature": 1.0},
        trainer={"lr": a.rl_lr, "optimizer": "adamw", "loss": {"eps_low": 0.2, "eps_high": 0.28},
                 "updates_per_batch": a.updates_per_batch},
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
        s = run_rl(rl_config(a, out, a.mode, a.rl_steps, eval_=True, reward=reward, seed=1))
        keep = {k: {x: y for x, y in s[k].items() if x != "per_task"} if isinstance(s.get(k), dict) else s.get(k)
                for k in ("before", "after", "delta", "before_sampled", "after_sampled", "delta_sampled")}
        keep["unseen_in_sft"] = subset_delta(a, s["before"], s["after"])
        if "before_sampled" in s:
            keep["unseen_in_sft_sampled"] = subset_delta(a, s["before_sampled"], s["after_sampled"])
        keep["run"] = {k: v for k, v in s["run"].items() if k != "buffer"}
        keep["run"]["staleness_hist"] = s["run"]["buffer"]["staleness_hist"]
        keep["run"]["dropped_stale_groups"] = s["run"]["buffer"]["dropped_stale_groups"]
        keep["wall_s"] = time.time() - t0
        results[reward] = keep
        for tag in ("", "_sampled"):
            if "before" + tag not in s:
                continue
            b, f, d = s["before" + tag], s["after" + tag], s["delta" + tag]
            log(f"  {tag or 'greedy'}: accuracy {b['accuracy']:.3f} -> {f['accuracy']:.3f} "
                f"(Δ {d['accuracy_delta']:+.3f}, CI {d['accuracy_delta_ci'][0]:+.3f}..{d['accuracy_delta_ci'][1]:+.3f})   "
                f"hallucination {b['hallucination_rate']:.3f} -> {f['hallucination_rate']:.3f} "
                f"(Δ {d['hallucination_delta']:+.3f}, CI {d['hallucination_delta_ci'][0]:+.3f}.."
                f"{d['hallucination_delta_ci'][1]:+.3f})   abstention {b['abstention_rate']:.3f} -> "
                f"{f['abstention_rate']:.3f}   unanswerable->IDK {b['unanswerable_abstention_rate']:.3f} -> "
                f"{f['unanswerable_abstention_rate']:.3f}")
    (Path(a.out) / "accept.json").write_text(json.dumps(results, indent=2, default=str))
    return results


THROUGHPUT_PLAN = [
    # (name, mode, placement, threads per process, overrides)
    ("sync/colocate/2t", "sync", "colocate", 2, {}),
    ("sync/process/1t", "sync", "process", 1, {}),
    ("sync/process/1t/oversample", "sync", "process", 1, {"over_sampling": 8}),
    ("one-step-off/process/1t", "one-step-off", "process", 1, {}),
    ("async/process/1t", "async", "process", 1, {}),
    ("async/process/1t/inflight32", "async", "process", 1, {"max_inflight_groups": 32}),
    ("async/process/1t/inflight48", "async", "process", 1, {"max_inflight_groups": 48}),
    # the trainer idles ~70% of the time even in async mode, so give the rollout process the second core
    # too (3 threads on 2 cores; OMP_WAIT_POLICY=PASSIVE keeps the idle trainer thread from spinning)
    ("async/process/rollout2t", "async", "process", 1, {"rollout_threads": 2}),
    ("sync/process/rollout2t", "sync", "process", 1, {"rollout_threads": 2}),
    # rollout data parallelism: two rollout engines (processes), 1 thread each, beside the 1-thread trainer
    ("sync/process/2workers", "sync", "process", 1, {"rollout_workers": 2}),
    ("sync/process/2workers/oversample", "sync", "process", 1, {"rollout_workers": 2, "over_sampling": 8}),
    ("async/process/2workers", "async", "process", 1, {"rollout_workers": 2}),
    ("async/process/2workers/inflight32", "async", "process", 1, {"rollout_workers": 2, "max_inflight_groups": 32}),
]
RUN_LEVEL_KEYS = ("rollout_threads", "train_threads", "rollout_workers")  # overrides that set RLConfig fields, not manager fields


def stage_throughput(a) -> dict:
    """Every configuration of THROUGHPUT_PLAN, ``repeats`` times, interleaved (so load changes on the shared box hit
    all of them alike); medians of trained samples per wall-clock second."""
    from glm5.rl.runner import run_rl

    runs: dict[str, list] = {}
    only = set(a.tp_only.split(",")) if a.tp_only else None
    for rep in range(a.repeats):
        for key, mode, placement, threads, over in THROUGHPUT_PLAN:
            if only and key not in only:
                continue
            out = str(Path(a.out) / "throughput" / f"{key.replace('/', '_')}_r{rep}")
            cfg = rl_config(a, out, mode, a.tp_steps, eval_=False, seed=10 + rep, n_eval=0, threads=threads,
                            placement=placement)
            for k, v in over.items():
                setattr(cfg if k in RUN_LEVEL_KEYS else cfg.manager, k, v)
            cfg.max_num_seqs = max(cfg.max_num_seqs, cfg.manager.max_inflight_groups * a.group_size,
                                   (a.groups + cfg.manager.over_sampling) * a.group_size)
            load0 = os.getloadavg()[0]
            s = run_rl(cfg)
            r = s["run"]
            rec = {"samples_per_s": r["samples_per_s"], "elapsed_s": r["elapsed_s"],
                   "trainer_idle_frac": r["trainer_idle_frac"], "generated_samples_per_s": r["generated_samples_per_s"],
                   "staleness_hist": r["buffer"]["staleness_hist"], "load_avg_before": load0,
                   "load_avg_after": os.getloadavg()[0]}
            runs.setdefault(key, []).append(rec)
            log(f"  {key} rep {rep}: {r['samples_per_s']:.2f} trained samples/s, {r['generated_samples_per_s']:.2f} "
                f"generated/s, trainer idle {100 * r['trainer_idle_frac']:.0f}%, load {load0:.1f}")
    med = {k: statistics.median(x["samples_per_s"] for x in v) for k, v in runs.items()}
    syncs = {k: v for k, v in med.items() if k.startswith("sync")}
    best_sync_key = max(syncs, key=syncs.get) if syncs else None
    res = {"runs": runs, "median_samples_per_s": med, "best_sync": best_sync_key,
           "ratios_over_best_sync": {k: v / syncs[best_sync_key] for k, v in med.items()} if syncs else {}}
    (Path(a.out) / "throughput.json").write_text(json.dumps(res, indent=2))
    log(f"median trained samples/s: {json.dumps({k: round(v, 2) for k, v in med.items()})}")
    log(f"over the best sync ({best_sync_key}): {json.dumps({k: round(v, 2) for k, v in res['ratios_over_best_sync'].items()})}")
    return res


def random_policy(a) -> str:
    """A randomly initialised policy of the SFT policy's shape (``--spec-model random``), with the SFT tokenizer:
    the rollout cost of each mode without the 36-minute SFT run. Its T = 1 responses end where an end or stop token
    happens to be drawn: longer on average than the SFT policy's, and as long in every mode (seeded)."""
    from glm5.model.transformer import GLM5ForCausalLM
    from glm5.tokenizer import GLM5Tokenizer

    out = Path(a.out)
    tok = GLM5Tokenizer.from_pretrained(out / "tokenizer") if (out / "data" / "sft.jsonl").exists() else sft_data(a)
    cfg = policy_config(tok.vocab_size).replace(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_ids)
    path = out / "random" / "hf"
    GLM5ForCausalLM(cfg).init_weights(0).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def stage_spec_pause(a) -> dict:
    from glm5.rl.rollout import RolloutConfig, build_rollout_engine
    from glm5.rl.sample import Sample
    from glm5.rl.tasks import load_tasks

    model = random_policy(a) if a.spec_model == "random" else str(Path(a.out) / "sft" / "hf")
    train_file, _ = task_files(a)
    tasks = load_tasks(train_file)[: a.spec_groups]
    ro_cfg = RolloutConfig(max_new_tokens=a.spec_max_new_tokens, reward=a.rewards, temperature=1.0, seed=1)
    ek = dict(max_num_seqs=len(tasks) * a.group_size, max_model_len=256, max_num_batched_tokens=4096)
    modes = {"plain": {}, f"{a.spec_tokens} drafts": {"num_speculative_tokens": a.spec_tokens}}
    for n in a.spec_pause:
        modes[f"{a.spec_tokens} drafts, paused above {n}"] = {"num_speculative_tokens": a.spec_tokens,
                                                               "spec_disable_batch_size": n}
    engines = {m: build_rollout_engine(model, engine_kwargs={**ek, **extra}, cfg=ro_cfg) for m, extra in modes.items()}
    clock = time.process_time
    best = {m: float("inf") for m in modes}
    outs, metrics = {}, {}
    load = [os.getloadavg()[0]]
    for rep in range(a.repeats):
        for m, ro in engines.items():
            samples = [Sample(prompt_ids=ro.make_prompt(t), task=t, group_id=g, index=i)
                       for g, t in enumerate(tasks) for i in range(a.group_size)]
            eng = ro.engine
            eng.stats.update(spec_verify_steps=0, spec_draft_tokens=0, spec_accepted_tokens=0, spec_paused_steps=0,
                             steps=0)
            # A fresh prefix cache, as in glm5 rl, where every weight push resets it: otherwise plain decoding reuses
            # the prompts of the previous repeat, and an engine that holds rows for a pause cannot publish its
            # blocks (their MTP entries are not final), so it recomputes them.
            eng.reset_prefix_cache()
            t = clock()
            done = ro.generate(samples)
            dt = clock() - t
            best[m] = min(best[m], dt)
            outs[m] = sorted((s.group_id, s.index, s.response_ids) for s in done)
            metrics[m] = {**eng.spec_metrics(), "steps": eng.stats["steps"]} if eng.proposer else \
                {"steps": eng.stats["steps"]}
            log(f"  {m} rep {rep}: {dt:.1f}s")
        load.append(os.getloadavg()[0])
    tokens = sum(len(r) for _, _, r in outs["plain"])
    n = len(outs["plain"])
    res = {"model": model, "samples": n, "tokens": tokens, "spec_tokens": a.spec_tokens, "repeats": a.repeats,
           "identical": all(o == outs["plain"] for o in outs.values()), "cpu_s": best,
           "tok_per_s": {m: tokens / t for m, t in best.items()}, "samples_per_s": {m: n / t for m, t in best.items()},
           "speedup": {m: best["plain"] / t for m, t in best.items()}, "metrics": metrics, "load_avg": load,
           "clock": "process CPU time", "threads": torch.get_num_threads()}
    (Path(a.out) / "specpause.json").write_text(json.dumps(res, indent=2))
    log(json.dumps({k: res[k] for k in ("samples", "tokens", "identical", "tok_per_s", "speedup")}))
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["all", "sft", "accept", "throughput", "specpause"])
    p.add_argument("--out", default="runs/bench_rl")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--sft-examples", type=int, default=8000)
    p.add_argument("--sft-idk-frac", type=float, default=0.1)
    p.add_argument("--sft-hard-frac", type=float, default=0.05)
    p.add_argument("--sft-cot-frac", type=float, default=0.5)
    p.add_argument("--sft-seq-len", type=int, default=128)
    p.add_argument("--sft-steps", type=int, default=1500)
    p.add_argument("--sft-minutes", type=float, default=25.0)
    p.add_argument("--sft-batch", type=int, default=32)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--rl-steps", type=int, default=60)
    p.add_argument("--rl-lr", type=float, default=5e-5)
    p.add_argument("--rl-train-tasks", type=int, default=3000)
    p.add_argument("--eval-tasks", type=int, default=600)
    p.add_argument("--unanswerable-frac", type=float, default=0.2)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--inflight-groups", type=int, default=16)
    p.add_argument("--tau", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rewards", default="abstention")
    p.add_argument("--mode", default="async", choices=["sync", "one-step-off", "async"])
    p.add_argument("--dynamic-sampling", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--eval-sampled", type=int, default=4, help="samples per held-out task for the T=1 evaluation")
    p.add_argument("--tp-steps", type=int, default=20)
    p.add_argument("--updates-per-batch", type=int, default=1, help="optimiser steps per rollout batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tp-only", default="", help="comma list of THROUGHPUT_PLAN names to run")
    p.add_argument("--spec-groups", type=int, default=16, help="specpause: groups in the rollout batch")
    p.add_argument("--spec-max-new-tokens", type=int, default=80, help="specpause: response budget")
    p.add_argument("--spec-tokens", type=int, default=3, help="specpause: MTP drafts per step")
    p.add_argument("--spec-pause", type=int, nargs="*", default=[4, 8, 16],
                   help="specpause: spec_disable_batch_size values (pause drafting above N sequences)")
    p.add_argument("--spec-model", choices=["sft", "random"], default="sft",
                   help="specpause: the SFT policy (bench_rl.py sft) or a randomly initialised one of its shape")
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
    if a.stage == "specpause":
        results["specpause"] = stage_spec_pause(a)
    results_path.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
