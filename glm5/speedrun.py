"""``glm5 speedrun``: the whole GLM-5 pipeline in one command.

    tokenizer -> pretrain (dense) -> DSA indexer warm-up -> sparse training -> SFT
              -> async RL with the abstention reward -> MTP self-distillation -> eval -> FP8 export -> report

Each stage writes into ``OUT/<stage>/`` and, when it has finished, an atomic ``OUT/<stage>/DONE.json``
(results + wall time). Re-running skips finished stages; a stage that was killed continues from its last
checkpoint (the trainer resumes by itself; RL restarts its stage). ``OUT/final`` is the served model
(``glm5 serve --model OUT/final``), ``OUT/final-fp8`` its FP8 export, ``OUT/report.md`` the report.

One knob, the preset, sizes everything: ``smoke`` (glm5-nano, ≤3 min on 2 CPU cores, used in CI),
``cpu`` (glm5-tiny, ≤30 min on 2 CPU cores, learns visibly), ``h100`` (glm5-small, about an hour on one
H100).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("tokenizer", "pretrain", "indexer_warmup", "sparse", "sft", "rl", "mtp", "eval", "fp8", "report")


@dataclass
class SpeedrunPreset:
    model: str  # model preset
    device: str
    seq_len: int
    batch_size: int
    pretrain_steps: int
    pretrain_minutes: float
    warmup_steps: int
    sparse_steps: int
    sparse_minutes: float
    sft_steps: int
    sft_minutes: float
    sft_examples: int
    rl_steps: int
    rl_group_size: int
    rl_groups_per_step: int
    rl_train_tasks: int
    rl_eval_tasks: int
    rl_max_new_tokens: int
    eval_tasks: int
    eval_ppl_batches: int
    eval_decode_tokens: int
    warmup_minutes: float = 1.0
    rl_mode: str = "async"
    rl_lr: float = 2e-5
    sft_lr: float | None = None  # None: the trainer's default
    # share of SFT records that are plain corpus passages (trained on every token): without them arithmetic-only
    # SFT took glm5-tiny's Shakespeare perplexity from ~250 to ~5,000 (benchmarks/speedrun.md)
    sft_text_fraction: float = 0.0
    sft_text_tokens: int = 64  # tokens per passage
    sparse_mtp_depth: int = 1  # MTP steps trained in the sparse stage (the one layer reused per step, as GLM-5)
    # The mtp stage: the final policy frozen, its MTP layer distilled towards the policy's own next-token
    # distribution over this many steps (0 = skip), on the SFT conversations. On the cpu preset's Shakespeare
    # base, 6 minutes of it took greedy acceptance with 3 drafts from 2.2 to 3.7 (benchmarks/engine.md §2).
    mtp_distill_steps: int = 0
    mtp_distill_minutes: float = 1.0
    mtp_distill_depth: int = 3
    lr: float | None = None
    extra: dict = field(default_factory=dict)


PRESETS = {
    "smoke": SpeedrunPreset(model="glm5-nano", device="cpu", seq_len=96, batch_size=4, pretrain_steps=30,
                            pretrain_minutes=0.6, warmup_steps=8, sparse_steps=12, sparse_minutes=0.3, sft_steps=12,
                            sft_minutes=0.3, sft_examples=120, rl_steps=2, rl_group_size=4, rl_groups_per_step=2,
                            rl_train_tasks=24, rl_eval_tasks=12, rl_max_new_tokens=24, eval_tasks=12,
                            eval_ppl_batches=2, eval_decode_tokens=16, warmup_minutes=0.3, sparse_mtp_depth=2,
                            sft_text_fraction=0.2, mtp_distill_steps=8, mtp_distill_minutes=0.2, mtp_distill_depth=2),
    # cpu: SFT gets 8 minutes because RL needs a sharp policy to start from: after 5 minutes (113 steps) the
    # SFT model's T=1 samples were 16% correct against 43% greedy, and RL from there lowered accuracy
    # (benchmarks/speedrun.md). RL's lr is 3e-6: one AdamW step at 1e-5 moves glm5-tiny's sequence
    # log-probs 2-5x more than glm5-nano's, where 1e-5 works. MTP stays at depth 1: a run with depth 3 in the
    # sparse stage accepted fewer drafts (1.5 vs 2.0 on Shakespeare prompts, 1.7 vs 2.1 on the eval prompts).
    # 0.3% of the SFT records (12 of 4,000) are corpus passages: corpus perplexity 600 after SFT instead of
    # 5,260 without them, at 89% task accuracy; 1% gave 467-486 but 58-61% accuracy, 5% and 20% less still
    # (benchmarks/speedrun.md, "Forgetting, and the fix").
    "cpu": SpeedrunPreset(model="glm5-tiny", device="cpu", seq_len=256, batch_size=8, pretrain_steps=1500,
                          pretrain_minutes=10.0, warmup_steps=60, sparse_steps=300, sparse_minutes=3.0, sft_steps=600,
                          sft_minutes=8.0, sft_examples=4000, sft_lr=1e-3, rl_steps=30, rl_group_size=8,
                          rl_groups_per_step=4, rl_train_tasks=600, rl_eval_tasks=200, rl_max_new_tokens=40,
                          rl_lr=3e-6, eval_tasks=200, eval_ppl_batches=16, eval_decode_tokens=64,
                          sft_text_fraction=0.003, mtp_distill_steps=300, mtp_distill_minutes=1.5),
    "h100": SpeedrunPreset(model="glm5-small", device="cuda", seq_len=1024, batch_size=32, pretrain_steps=6000,
                           pretrain_minutes=30.0, warmup_steps=200, sparse_steps=1500, sparse_minutes=8.0,
                           sft_steps=1500, sft_minutes=8.0, sft_examples=20000, rl_steps=40, rl_group_size=16,
                           rl_groups_per_step=16, rl_train_tasks=4000, rl_eval_tasks=400, rl_max_new_tokens=256,
                           eval_tasks=400, eval_ppl_batches=64, eval_decode_tokens=256, sparse_mtp_depth=3,
                           # RL lr: a larger model, no larger step (untested)
                           rl_lr=2e-6, sft_text_fraction=0.003, mtp_distill_steps=500, mtp_distill_minutes=3.0),
}


SFT_TASK_SEED = 4242  # RL trains on small seeds, eval uses 12345: three disjoint draws of the same families
IDK_REASONS = ("The question leaves out something I would need, so it cannot be worked out.",
               "Not enough is given to determine this.",
               "An essential quantity is missing from the question.")


def speedrun_sft_conversations(n: int, seed: int, unanswerable_frac: float = 0.2) -> list[dict]:
    """SFT conversations over RL's default task families and eval's ``arith``: answerable ones solved step by
    step in the reasoning (``glm5.data.sft.worked_arithmetic``) with the bare answer as content, unanswerable
    ones answered "I don't know." with a reason."""
    import random

    from glm5.data.sft import IDK, worked_arithmetic
    from glm5.rl.runner import DEFAULT_TASKS
    from glm5.rl.tasks import make_task_set

    rng = random.Random(seed)
    convs = []
    for t in make_task_set(list(DEFAULT_TASKS) + ["arith"], n, seed=seed, unanswerable_frac=unanswerable_frac):
        if t["answerable"]:
            # the task generators guarantee the answer matches the expression (glm5.rl.tasks)
            steps, answer = worked_arithmetic(t["question"].removeprefix("Calculate").strip().rstrip("."))
            # keep only the worked steps ("7 * 8 = 56."): short answers fit a small rollout budget
            reasoning = "\n".join(steps.splitlines()[1:-1]) or steps
        else:
            reasoning, answer = rng.choice(IDK_REASONS), IDK
        convs.append({"messages": [{"role": "user", "content": t["question"]},
                                   {"role": "assistant", "reasoning_content": reasoning, "content": answer}],
                      "meta": {"task": t["task"], "answer": answer}})
    return convs


def corpus_passages(tokens, tokenizer, n: int, length: int, seed: int) -> list[dict]:
    """``n`` SFT text records: random ``length``-token windows of a pretraining split (``tokens``, a 1-D token
    array), each cut at its first document end and decoded back to text."""
    import numpy as np

    if n <= 0:
        return []
    if len(tokens) <= length:
        raise ValueError(f"the corpus split has {len(tokens)} tokens, too few for {length}-token passages")
    eos = tokenizer.eos_token_id
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    for _ in range(20 * n):
        start = int(rng.integers(0, len(tokens) - length))
        window = np.asarray(tokens[start:start + length]).tolist()
        if eos in window:  # one document per passage: the record adds its own EOS
            window = window[:window.index(eos)]
        text = tokenizer.decode(window)
        if text.strip():  # a window that starts on a document end is empty: draw another
            out.append({"text": text, "meta": {"task": "corpus"}})
            if len(out) == n:
                return out
    raise ValueError(f"could not cut {n} non-empty passages from the corpus split")


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def preset_with_overrides(preset: str, overrides: list[str] | dict | None = None) -> SpeedrunPreset:
    """``PRESETS[preset]`` with fields replaced: ``["sft_text_fraction=0", "rl_lr=1e-6"]`` or a dict. Values are
    parsed as JSON (bare strings allowed) and must fit the field's type; unknown fields are an error."""
    import dataclasses

    if preset not in PRESETS:
        raise SystemExit(f"glm5 speedrun: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    if not overrides:
        return base
    if not isinstance(overrides, dict):
        pairs = {}
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise SystemExit(f"glm5 speedrun: --set expects KEY=VALUE, got {item!r}")
            try:
                pairs[key.strip()] = json.loads(raw)
            except json.JSONDecodeError:
                pairs[key.strip()] = raw
        overrides = pairs
    fields = {f.name for f in dataclasses.fields(SpeedrunPreset)}
    clean = {}
    for key, value in overrides.items():
        if key not in fields:
            raise SystemExit(f"glm5 speedrun: unknown preset field {key!r}; fields: {', '.join(sorted(fields))}")
        old = getattr(base, key)
        if isinstance(old, bool) or isinstance(value, bool):
            ok = isinstance(value, bool) and (old is None or isinstance(old, bool))
        elif isinstance(old, (int, float)) or (old is None and key.endswith(("lr", "fraction"))):
            ok = isinstance(value, (int, float)) and (not isinstance(old, int) or isinstance(value, int))
        else:
            ok = old is None or value is None or isinstance(value, type(old))
        if not ok:
            raise SystemExit(f"glm5 speedrun: {key}={value!r} does not fit the field (now {old!r})")
        clean[key] = float(value) if isinstance(old, float) else value
    return dataclasses.replace(base, **clean)


class Speedrun:
    def __init__(self, out: str | Path, preset: str = "smoke", log=print, overrides: list[str] | dict | None = None):
        self.p = preset_with_overrides(preset, overrides)
        self.out = Path(out)
        self.name = preset
        self.log = log
        self.cache = str(self.out / "cache")

    # ------------------------------------------------------------------------------------------ plumbing
    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def done(self, stage: str) -> dict | None:
        f = self.stage_dir(stage) / "DONE.json"
        return json.loads(f.read_text()) if f.exists() else None

    def run(self, only: list[str] | None = None) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.out / "speedrun.json", {"preset": self.name, "settings": self.p.__dict__})
        results = {}
        for stage in STAGES:
            if only and stage not in only:
                continue
            prev = self.done(stage)
            if prev is not None:
                self.log(f"[speedrun] {stage}: done earlier ({prev['wall_s']:.1f}s), skipping")
                results[stage] = prev
                continue
            self.log(f"[speedrun] {stage}: running")
            self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            res = getattr(self, f"stage_{stage}")()
            rec = {"stage": stage, "wall_s": time.time() - t0, "result": res}
            _write_json_atomic(self.stage_dir(stage) / "DONE.json", rec)
            results[stage] = rec
            self.log(f"[speedrun] {stage}: finished in {rec['wall_s']:.1f}s")
        return results

    def _train(self, **kw) -> dict:
        from glm5.train.config import TrainConfig
        from glm5.train.trainer import train

        p = self.p
        base = dict(preset=p.model, tokenizer=str(self.stage_dir("tokenizer")), cache_dir=self.cache,
                    seq_len=p.seq_len, batch_size=p.batch_size, device=p.device, eval_every=max(10, kw.get("max_steps", 100) // 5),
                    eval_batches=4, ckpt_every=max(10, kw.get("max_steps", 100) // 4), progress=sys.stderr.isatty())
        if p.lr:
            base["lr"] = p.lr
        base.update(kw)
        res = train(TrainConfig(**base))
        return {k: v for k, v in res.items() if isinstance(v, (int, float, str, type(None), list, dict))}

    # ------------------------------------------------------------------------------------------ stages
    def stage_tokenizer(self) -> dict:
        from glm5.config import preset
        from glm5.data.tokenize import prepare_tokenizer

        vocab = preset(self.p.model).vocab_size
        tok, _ = prepare_tokenizer(["default"], vocab, self.cache)
        tok.save_pretrained(self.stage_dir("tokenizer"))
        return {"vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint()}

    def stage_pretrain(self) -> dict:
        return self._train(out=str(self.stage_dir("pretrain")), dsa="dense", max_steps=self.p.pretrain_steps,
                           max_minutes=self.p.pretrain_minutes)

    def stage_indexer_warmup(self) -> dict:
        return self._train(out=str(self.stage_dir("indexer_warmup")), dsa="indexer-warmup",
                           init_from=str(self.stage_dir("pretrain") / "hf"), max_steps=self.p.warmup_steps,
                           max_minutes=self.p.warmup_minutes)

    def stage_sparse(self) -> dict:
        return self._train(out=str(self.stage_dir("sparse")), dsa="sparse", max_steps=self.p.sparse_steps,
                           init_from=str(self.stage_dir("indexer_warmup") / "hf"), max_minutes=self.p.sparse_minutes,
                           mtp_depth=self.p.sparse_mtp_depth)

    def stage_sft(self) -> dict:
        # SFT on the task family that RL trains and eval scores (as nanochat's SFT mixture targets its evals);
        # the generic default set spreads a few minutes of CPU SFT over too many formats to learn any
        # plus corpus passages, so the served model still writes in the corpus's style (see sft_text_fraction)
        import random

        from glm5.data.tokenize import load_tokens, prepare_dataset
        from glm5.tokenizer import GLM5Tokenizer

        p = self.p
        data = self.stage_dir("sft") / "sft_data.jsonl"
        convs = speedrun_sft_conversations(p.sft_examples, seed=SFT_TASK_SEED)
        n_text = round(p.sft_examples * p.sft_text_fraction / max(1e-9, 1 - p.sft_text_fraction))
        if n_text:
            tok = GLM5Tokenizer.from_pretrained(self.stage_dir("tokenizer"))
            train_tokens = load_tokens(prepare_dataset(["default"], tok, self.cache), "train")
            convs += corpus_passages(train_tokens, tok, n_text, p.sft_text_tokens, seed=SFT_TASK_SEED)
            random.Random(SFT_TASK_SEED).shuffle(convs)
        data.write_text("".join(json.dumps(c) + "\n" for c in convs))
        return self._train(mode="sft", out=str(self.stage_dir("sft")), dsa="sparse", max_steps=self.p.sft_steps,
                           init_from=str(self.stage_dir("sparse") / "hf"), max_minutes=self.p.sft_minutes,
                           data=[str(data)], seq_len=max(self.p.seq_len, 256), lr=self.p.sft_lr)

    def stage_rl(self) -> dict:
        from glm5.rl.runner import RLConfig, run_rl

        p = self.p
        cfg = RLConfig(model=str(self.stage_dir("sft") / "hf"), out=str(self.stage_dir("rl")),
                       n_train=p.rl_train_tasks, n_eval=p.rl_eval_tasks, group_size=p.rl_group_size,
                       device=p.device, rollout_device=p.device, max_model_len=min(1024, 4 * p.seq_len),
                       manager={"mode": p.rl_mode, "num_steps": p.rl_steps, "groups_per_step": p.rl_groups_per_step,
                                "tau": 2},
                       rollout={"max_new_tokens": p.rl_max_new_tokens, "reward": "abstention"},
                       trainer={"lr": p.rl_lr}, progress=sys.stderr.isatty())
        summary = run_rl(cfg)
        keep = ("before", "after", "delta", "run")
        return {k: summary.get(k) for k in keep}

    def stage_mtp(self) -> dict:
        """Self-distil the RL policy's MTP layer: the policy is frozen (bit-identical) and its MTP layer learns the
        policy's own next-token distribution on the SFT conversations, so speculative drafts agree with the model
        that is served. The result is ``OUT/final``."""
        p = self.p
        src, res = self.stage_dir("rl") / "hf", {"skipped": True}
        if p.mtp_distill_steps > 0:
            res = self._train(mode="sft", out=str(self.stage_dir("mtp")), dsa="sparse", init_from=str(src),
                              data=[str(self.stage_dir("sft") / "sft_data.jsonl")], seq_len=max(p.seq_len, 256),
                              mtp_only=True, mtp_target="self", mtp_depth=p.mtp_distill_depth,
                              max_steps=p.mtp_distill_steps, max_minutes=p.mtp_distill_minutes)
            src = self.stage_dir("mtp") / "hf"
        final = self.out / "final"
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(src, final)
        return res

    def stage_eval(self) -> dict:
        from glm5.eval.evaluate import EvalConfig, evaluate

        p = self.p
        cfg = EvalConfig(n_tasks=p.eval_tasks, ppl_batches=p.eval_ppl_batches, decode_tokens=p.eval_decode_tokens,
                         seq_len=p.seq_len, max_new_tokens=p.rl_max_new_tokens, cache_dir=self.cache)
        rows = [evaluate(self.stage_dir("sft") / "hf", cfg, device=p.device, progress=self.log),
                evaluate(self.out / "final", cfg, device=p.device, progress=self.log)]
        rows[0]["label"], rows[1]["label"] = "SFT", "final (RL)"
        _write_json_atomic(self.stage_dir("eval") / "eval.json", rows)
        _write_json_atomic(self.stage_dir("eval") / "samples.json", self._samples())
        return {"sft": rows[0], "final": rows[1]}

    def _samples(self) -> dict:
        """What the models write: the pretrained base continuing the corpus, the final model chatting."""
        from glm5.engine import LLM, SamplingParams
        from glm5.rl.tasks import build_messages

        base = LLM(str(self.stage_dir("sparse") / "hf"), device=self.p.device, max_model_len=512)
        prompts = ["ROMEO.\n", "To be, or not to be", "KING HENRY.\nMy lords,"]
        # a seed per prompt: one seed fixes each position's random numbers, so three prompts sharing it would
        # continue in near-lockstep wherever the model's distributions are alike
        sp = [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=60, seed=i) for i in range(len(prompts))]
        base_out = [p + o.outputs[0].text for p, o in zip(prompts, base.generate(prompts, sp, use_tqdm=False))]
        chat = LLM(str(self.out / "final"), device=self.p.device, max_model_len=512)
        questions = ["Calculate 7 * 8.", "Calculate 9 - 4.", "Calculate 6 + 7.",
                     "Nora has some marbles. She gives 3 away. How many marbles does Nora have now?"]
        ids = [chat.tokenizer.apply_chat_template(build_messages({"question": q}), tokenize=True,
                                                  add_generation_prompt=True) for q in questions]
        outs = chat.generate(ids, SamplingParams(temperature=0.0, max_tokens=self.p.rl_max_new_tokens),
                             use_tqdm=False)
        return {"base": base_out, "chat": [{"question": q, "answer": o.outputs[0].text} for q, o in zip(questions, outs)]}

    def stage_fp8(self) -> dict:
        from glm5.checkpoint.quantize import quantize_checkpoint
        from glm5.info import disk_bytes

        dst = self.out / "final-fp8"
        if dst.exists():
            shutil.rmtree(dst)
        quantize_checkpoint(self.out / "final", dst)
        return {"bf16_or_fp32_bytes": disk_bytes(self.out / "final"), "fp8_bytes": disk_bytes(dst)}

    def stage_report(self) -> dict:
        from glm5.report import write_report

        path = write_report(self.out)
        return {"report": str(path)}


def add_parser(sub) -> None:
    p = sub.add_parser("speedrun", help="the whole pipeline: tokenizer, pretrain, DSA, SFT, RL, eval, FP8, report")
    p.add_argument("--preset", default="cpu", choices=list(PRESETS),
                   help="cpu (default): ~25 min on 2 CPU cores, learns visibly; smoke: ≤3 min (CI); h100: ~1 h on one H100")
    p.add_argument("--out", default=None, help="run directory (default runs/speedrun-PRESET)")
    p.add_argument("--only", nargs="+", choices=list(STAGES), help="run just these stages (others must be done)")
    p.add_argument("--fresh", action="store_true", help="delete the run directory first")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field, e.g. --set sft_text_fraction=0 (repeatable); stages done "
                        "earlier are not re-run")

    def _run(a):
        out = Path(a.out or f"runs/speedrun-{a.preset}")
        if a.fresh and out.exists():
            shutil.rmtree(out)
        t0 = time.time()
        from glm5.train.interrupt import Interrupted

        try:
            Speedrun(out, a.preset, log=lambda s: print(s, flush=True), overrides=a.overrides).run(a.only)
        except Interrupted as e:  # Ctrl-C / SIGTERM in a training or RL stage: it saved a checkpoint
            print(f"[speedrun] {e.message}", file=sys.stderr)
            return e.exit_code
        print(f"[speedrun] all stages done in {time.time() - t0:.1f}s -> {out}/report.md; "
              f"serve it with: glm5 serve --model {out}/final")
        return 0

    p.set_defaults(func=_run)
