"""Inference-engine benchmarks (not a test): glm5.engine vs transformers ``generate`` on the same weights.

    python3 benchmarks/bench_engine.py                       # everything, CPU, fp32, writes benchmarks/engine.json
    python3 benchmarks/bench_engine.py --only decode --preset glm5-tiny --contexts 128 1024
    python3 benchmarks/bench_engine.py --only mtp --mtp-model runs/tiny-mtp/hf
    python3 benchmarks/bench_engine.py --only dsa --dsa-context 32768

Sections
  decode   decode tokens/s at batch 1 and 16 for several context lengths, engine vs transformers 5.23
           GlmMoeDsaForCausalLM.generate, loaded from the same saved checkpoint (random init, fp32). Each system
           generates 1 + D tokens per prompt. transformers: a logits processor stamps the clock at each step, so
           decode = end - first stamp (D steps) and prefill = first stamp - start. Engine: driven step by step;
           decode = the steps where every sequence is decoding, prefill = the others. Best of ``--repeats``.
           Greedy outputs of the two are compared as a sanity check: DSA's hard top-k turns last-bit
           differences (batched vs single prefill, chunked vs whole prompt) into different selections on
           random weights, so long contexts can diverge without any bug (see benchmarks/engine.md).
  prefill  prefill tokens/s (time to the first token) for the same runs.
  mtp      MTP speculative decoding at batch 1: acceptance length (tokens per verification step, bonus
           included) and decode speed-up with --spec-tokens drafts. Models: a checkpoint trained with
           ``glm5 train --mtp-depth 3`` (--mtp-model); toy models trained here for --toy-steps on arithmetic
           progressions (main + 3 shared MTP steps, the trainer's recursion) where multi-token prediction is
           learnable in a minute; and a random-init model (acceptance ~1: the cost of drafting).
  gpu      (CUDA only) batch-1 decode tokens/s in bf16 as a fraction of the HBM-bandwidth roofline:
           bandwidth (measured with a large device copy) / bytes read per decoded token (activated weights:
           attention, dense MLP or shared + top-k experts, final norm, lm_head, one embedding row; plus the latent
           and indexer cache of the context).
  gpumtp   (CUDA only) MTP speculation at batch 1 on the toy MTP model in bf16: plain and speculative decoding,
           each eager and through CUDA graphs (benchmarks/gpu_mtp.py).
  specbatch  MTP speculation as a batch shrinks (staggered lengths): plain, always drafting, and drafting paused
           above --spec-disable-batch-size sequences (EngineConfig.spec_disable_batch_size); needs --mtp-model.
  specsampled  MTP draft acceptance for sampled requests (--mtp-model): seeded ones (drafts raced on position-keyed
           noise, accepted when they equal the target's race winner) against unseeded ones (rejection sampling),
           at T = 0.7 and 1, greedy for reference; --mtp-corpus-prompts snippets (default 32) decoded together.
  dsa      attention cost per decoded token at a long context, GLM-5's real attention shapes (64 heads,
           kv_lora 512, rope 64, indexer 32x128, top-k 2048): DSA (indexer over all keys + top-k + latent
           attention over 2048 gathered rows) vs dense latent attention over every key. Reports time and FLOPs.

Timings on a shared 2-core CPU are noisy: by default torch runs one intra-op thread and the clock is the
process CPU time (``time.process_time``), which does not count time the process spends descheduled by other
jobs; ``--wall`` uses wall-clock time instead. Ratios are taken within one run, interleaving the two systems.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glm5 import GLM5ForCausalLM, preset  # noqa: E402
from glm5.engine import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402

from roofline import activated_weight_bytes, bench_gpu, cache_bytes_read, copy_bandwidth  # noqa: E402


clock = time.process_time


def _prompts(B: int, P: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (B, P), generator=g)


class HF:
    def __init__(self, path):
        import transformers
        from transformers import GlmMoeDsaForCausalLM

        transformers.logging.set_verbosity_error()
        self.model = GlmMoeDsaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.version = transformers.__version__

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
        t = clock()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0)
        return clock() - t, out[:, ids.shape[1]:]

    @torch.inference_mode()
    def timed(self, ids: torch.Tensor, n: int) -> tuple[float, float, torch.Tensor]:
        """One ``generate`` call; (prefill seconds, seconds for the n-1 decode steps, tokens). A logits processor
        stamps the clock at every step: its first call comes right after the prefill forward."""
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps = []

        class Stamp(LogitsProcessor):
            def __call__(self, input_ids, scores):
                stamps.append(clock())
                return scores

        t = clock()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([Stamp()]))
        end = clock()
        # decode step i = forward + sampling between stamps; the last step ends when generate returns
        return stamps[0] - t, end - stamps[0], out[:, ids.shape[1]:]


MAX_BATCHED_TOKENS = 4096


class Engine:
    def __init__(self, path, max_model_len: int, spec: int = 0, **kw):
        kw.setdefault("max_num_batched_tokens", MAX_BATCHED_TOKENS)
        self.llm = LLM(str(path), device="cpu", dtype=torch.float32, max_num_seqs=16, max_model_len=max_model_len,
                       enable_prefix_caching=False, num_speculative_tokens=spec, **kw)

    def run(self, ids: torch.Tensor, n: int, regex: str | None = None) -> tuple[float, torch.Tensor]:
        """Greedy, ``n`` tokens (``regex``: under that structured output, stopping where it allows EOS)."""
        so = StructuredOutputsParams(regex=regex) if regex is not None else None
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=regex is None, structured_outputs=so)
        t = clock()
        outs = self.llm.generate(ids.tolist(), sp, use_tqdm=False)
        return clock() - t, [o.outputs[0].token_ids for o in outs]

    def timed(self, ids: torch.Tensor, n: int) -> tuple[float, float, torch.Tensor]:
        """Drive the engine step by step: (seconds of steps that prefill, seconds of pure decode steps, tokens)."""
        eng = self.llm.engine
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        rids = [eng.add_request(p, sp) for p in ids.tolist()]
        prefill = decode = 0.0
        done = {}
        while eng.has_unfinished_requests():
            pure = all(s.in_decode for s in eng.scheduler.running) and not eng.scheduler.waiting
            t = clock()
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o
            dt = clock() - t
            if pure:
                decode += dt
            else:
                prefill += dt
        return prefill, decode, torch.tensor([done[r].outputs[0].token_ids for r in rids])


def _best(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t, o = fn()
        if t < best:
            best, out = t, o
    return best, out


def bench_decode(args, path, cfg, results):
    hf, eng = HF(path), Engine(path, max(args.contexts) + args.decode_tokens + 8)
    systems = [("hf", hf), ("engine", eng)]
    if args.compare_row_layout:  # the same engine with the CPU weight-layout tuning off (glm5/engine/cpu_layout.py)
        systems.append(("engine_row", Engine(path, max(args.contexts) + args.decode_tokens + 8, cpu_weight_layout="row")))
    if args.compare_compiled:  # the same engine with its decode steps torch.compile'd when built (compile_decode)
        systems.append(("engine_compiled", Engine(path, max(args.contexts) + args.decode_tokens + 8,
                                                  compile_decode=True)))
    if args.compare_packed_head:  # the engine (compiled, with --compare-compiled) without the packed LM head
        import glm5.engine.llm_engine as llm_engine

        packed_head, llm_engine.packed_head = llm_engine.packed_head, lambda model: None
        try:
            systems.append(("engine_unpacked", Engine(path, max(args.contexts) + args.decode_tokens + 8,
                                                      compile_decode=args.compare_compiled)))
        finally:
            llm_engine.packed_head = packed_head
    results["transformers"] = hf.version
    # Memory roofline of a decode step on this machine: the fewest bytes a step must read (weights the batch
    # activates + the latent cache it attends to) at the measured copy bandwidth. No implementation decodes
    # faster than this in fp32, so roofline / transformers bounds the speed-up any engine can show here.
    bw = copy_bandwidth(torch.device("cpu"))
    model = eng.llm.engine.runner.model
    results["copy_bandwidth_gb_s"] = bw / 1e9
    rows = []
    warm = _prompts(1, 16, cfg.vocab_size, 0)
    for _, sysm in systems:
        sysm.timed(warm, 3)
    for P in args.contexts:
        for B in args.batches:
            D = args.decode_tokens
            ids = _prompts(B, P, cfg.vocab_size, seed=P * 100 + B)
            res = {}
            for name, sysm in systems:
                best = None
                for _ in range(args.repeats):
                    pre, dec, toks = sysm.timed(ids, 1 + D)
                    if best is None or dec < best[1]:
                        best = (pre, dec, toks)
                pre, dec, toks = best
                res[name] = dict(decode_tok_s=B * D / dec, prefill_tok_s=B * P / pre, tokens=toks)
            same = sum(bool(torch.equal(a, b)) for a, b in zip(res["hf"]["tokens"], res["engine"]["tokens"]))
            row = dict(context=P, batch=B, decode_tokens=D,
                       hf_decode_tok_s=res["hf"]["decode_tok_s"], engine_decode_tok_s=res["engine"]["decode_tok_s"],
                       decode_speedup=res["engine"]["decode_tok_s"] / res["hf"]["decode_tok_s"],
                       hf_prefill_tok_s=res["hf"]["prefill_tok_s"], engine_prefill_tok_s=res["engine"]["prefill_tok_s"],
                       prefill_speedup=res["engine"]["prefill_tok_s"] / res["hf"]["prefill_tok_s"],
                       greedy_identical=f"{same}/{B}")
            if "engine_compiled" in res:
                c = res["engine_compiled"]
                row["compiled_decode_tok_s"] = c["decode_tok_s"]
                row["compiled_decode_speedup"] = c["decode_tok_s"] / res["hf"]["decode_tok_s"]
                row["compiled_over_eager_engine"] = c["decode_tok_s"] / res["engine"]["decode_tok_s"]
                row["compiled_greedy_identical"] = \
                    f"{sum(bool(torch.equal(a, b)) for a, b in zip(res['hf']['tokens'], c['tokens']))}/{B}"
            if "engine_unpacked" in res:
                ref = "engine_compiled" if args.compare_compiled else "engine"
                row["unpacked_head_decode_tok_s"] = res["engine_unpacked"]["decode_tok_s"]
                row["packed_head_gain"] = res[ref]["decode_tok_s"] / res["engine_unpacked"]["decode_tok_s"]
            if "engine_row" in res:
                row["engine_row_layout_decode_tok_s"] = res["engine_row"]["decode_tok_s"]
                row["layout_tuning_gain"] = res["engine"]["decode_tok_s"] / res["engine_row"]["decode_tok_s"]
            step_bytes = activated_weight_bytes(model, B) + cache_bytes_read(cfg, B, P + D // 2, 4)
            row["roofline_decode_tok_s"] = B * bw / step_bytes
            row["engine_fraction_of_roofline"] = row["engine_decode_tok_s"] / row["roofline_decode_tok_s"]
            if "engine_compiled" in res:
                row["compiled_fraction_of_roofline"] = row["compiled_decode_tok_s"] / row["roofline_decode_tok_s"]
            row["max_speedup_at_roofline"] = row["roofline_decode_tok_s"] / row["hf_decode_tok_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    results["decode"] = rows


TOY_V = 64


def _toy_batch(B: int, S: int, g: torch.Generator) -> torch.Tensor:
    """Arithmetic progressions mod 63 over ids 1..63 with a random start and a step in {1, 2, 3}: the next tokens
    follow from the last two, so a trained model (and its MTP layer) can predict several tokens ahead."""
    a = torch.randint(0, TOY_V - 1, (B, 1), generator=g)
    step = torch.randint(1, 4, (B, 1), generator=g)
    return 1 + (a + step * torch.arange(S)[None]) % (TOY_V - 1)


def train_toy_mtp(out: Path, preset_name: str, steps: int, mtp_depth: int = 3) -> Path:
    """Train a small model (main CE + mean of ``mtp_depth`` MTP CEs, the recursion the trainer uses: step d feeds
    h^{d-1} and x_{t+d} at the same positions) on the progression task. DSA's top-k is set above the context so
    the untrained indexer plays no part (dense-equivalent attention)."""
    import torch.nn.functional as F

    from glm5.model.cache import build_attention_mask

    cfg = preset(preset_name, vocab_size=TOY_V, index_topk=1024, pad_token_id=0, eos_token_id=[0])
    m = GLM5ForCausalLM(cfg).init_weights(0).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    B, S = 8, 96
    mask = build_attention_mask(B, S, 0, torch.device("cpu"))
    pos = torch.arange(S)[None].expand(B, S)
    log = []
    for step in range(steps):
        x = _toy_batch(B, S, g)
        o = m(x, dsa="dense")
        loss = F.cross_entropy(o.logits[:, :-1].reshape(-1, TOY_V), x[:, 1:].reshape(-1))
        h, mtp_loss, accs = o.hidden_states, 0.0, []
        for d in range(1, mtp_depth + 1):
            logits, h = m.mtp_forward(h, torch.roll(x, -d, 1), pos, mask, dsa="dense")
            lg, tgt = logits[:, : S - d - 1], x[:, d + 1:]
            mtp_loss = mtp_loss + F.cross_entropy(lg.reshape(-1, TOY_V), tgt.reshape(-1))
            accs.append(float((lg.argmax(-1) == tgt).float().mean()))
        opt.zero_grad()
        (loss + mtp_loss / mtp_depth).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        acc = float((o.logits[:, 1:-1].argmax(-1) == x[:, 2:]).float().mean())
        log.append(dict(step=step, loss=float(loss), acc=acc, mtp_acc=accs))
        if step % 10 == 0 or step == steps - 1:
            print(f"toy {preset_name} step {step} loss {float(loss):.3f} acc {acc:.3f} mtp acc {[round(a, 3) for a in accs]}",
                  flush=True)
    m.eval().save_pretrained(out)
    (out / "toy_train_log.json").write_text(json.dumps(log))
    return out


def _spec_point(name, p, ids, D, spec_tokens, repeats, dsa="sparse"):
    plain = Engine(p, ids.shape[1] + D + 16, dsa=dsa)
    spec = Engine(p, ids.shape[1] + D + 16, spec=spec_tokens, dsa=dsa)
    plain.run(ids[:, :8], 2)
    spec.run(ids[:, :8], 2)
    tp1, _ = _best(lambda: plain.run(ids, 1), repeats)
    tpn, a = _best(lambda: plain.run(ids, 1 + D), repeats)
    ts1, _ = _best(lambda: spec.run(ids, 1), repeats)
    spec.llm.engine.stats.update(spec_verify_steps=0, spec_draft_tokens=0, spec_accepted_tokens=0)
    tsn, b = _best(lambda: spec.run(ids, 1 + D), repeats)
    m = spec.llm.spec_metrics()
    row = dict(model=name, spec_tokens=spec_tokens, prompt_tokens=int(ids.shape[1]), decode_tokens=D,
               acceptance_length=m["acceptance_length"], acceptance_rate=m["acceptance_rate"],
               plain_decode_tok_s=D / (tpn - tp1), spec_decode_tok_s=D / (tsn - ts1),
               speedup=(tpn - tp1) / (tsn - ts1), greedy_identical=a == b)
    print(json.dumps(row), flush=True)
    return row


def _corpus_prompts(model_dir, n: int, prompt_tokens: int) -> list[list[int]]:
    """n snippets of the default corpus, prompt_tokens ids each (fixed seed)."""
    import random

    from glm5.data.corpus import default_corpus_files
    from glm5.tokenizer import GLM5Tokenizer

    tok = GLM5Tokenizer.from_pretrained(model_dir)
    files, rng, prompts = sorted(default_corpus_files()), random.Random(0), []
    while len(prompts) < n:
        text = Path(rng.choice(files)).read_text(encoding="utf-8", errors="ignore")
        start = rng.randrange(max(1, len(text) - 32 * prompt_tokens))  # room for the 8-chars-per-token slice
        ids = tok.encode(text[start:start + 8 * prompt_tokens])[:prompt_tokens]
        if len(ids) == prompt_tokens:
            prompts.append(ids)
    return prompts


def bench_spec_batch(args, results):
    """MTP speculation under a shrinking batch: n corpus prompts submitted together, greedy, with staggered lengths
    (8, 16, ..., 8n tokens), so the batch runs from n sequences down to 1. Plain decoding, drafting at every step,
    and drafting paused while more than --spec-disable-batch-size sequences run; total process time each,
    alternating, best of --repeats; outputs must be identical."""
    if not args.mtp_model:
        raise SystemExit("--only specbatch needs --mtp-model (a checkpoint with a trained MTP layer)")
    ps = _corpus_prompts(args.mtp_model, args.spec_batch_prompts, 32)
    sps = [SamplingParams(temperature=0, max_tokens=8 * (i + 1), ignore_eos=True) for i in range(len(ps))]
    kw = dict(device="cpu", dtype=torch.float32, max_num_seqs=len(ps), max_model_len=32 + 8 * len(ps) + 8,
              enable_prefix_caching=False)
    modes = {"plain": {}, "spec": {"num_speculative_tokens": args.spec_tokens},
             f"spec, paused above {args.spec_disable_batch_size}": {
                 "num_speculative_tokens": args.spec_tokens, "spec_disable_batch_size": args.spec_disable_batch_size}}
    engines = {m: LLM(args.mtp_model, **kw, **extra) for m, extra in modes.items()}
    best, outs = {m: float("inf") for m in modes}, {}
    for _ in range(args.repeats):
        for m, llm in engines.items():
            t = clock()
            o = llm.generate(ps, sps, use_tqdm=False)
            best[m] = min(best[m], clock() - t)
            outs[m] = [x.outputs[0].token_ids for x in o]
    tokens = sum(len(t) for t in outs["plain"])
    row = dict(model=args.mtp_model, prompts=len(ps), tokens=tokens, spec_tokens=args.spec_tokens,
               identical=all(o == outs["plain"] for o in outs.values()),
               tok_per_s={m: tokens / t for m, t in best.items()},
               speedup={m: best["plain"] / t for m, t in best.items()},
               metrics={m: e.spec_metrics() for m, e in engines.items() if m != "plain"})
    print(json.dumps(row), flush=True)
    results["spec_batch"] = row


def bench_spec_sampled(args, results):
    """Acceptance of coupled drafts (seeded requests) vs rejection sampling (unseeded), same prompts and engine."""
    if not args.mtp_model:
        raise SystemExit("--only specsampled needs --mtp-model (a checkpoint with a trained MTP layer)")
    n, D = args.mtp_corpus_prompts or 32, args.mtp_decode_tokens
    ps = _corpus_prompts(args.mtp_model, n, 32)
    llm = LLM(args.mtp_model, device="cpu", dtype=torch.float32, max_num_seqs=n, max_model_len=32 + D + 8,
              enable_prefix_caching=False, num_speculative_tokens=args.spec_tokens, mtp_draft_mode=args.mtp_draft_mode)
    rows = []
    for temp, seeded in ((0.0, False), (0.7, True), (0.7, False), (1.0, True), (1.0, False)):
        sps = [SamplingParams(temperature=temp, seed=1000 + i if seeded else None, max_tokens=D, ignore_eos=True)
               for i in range(n)]
        llm.engine.stats.update(spec_verify_steps=0, spec_draft_tokens=0, spec_accepted_tokens=0)
        llm.generate(ps, sps, use_tqdm=False)
        m = llm.spec_metrics()
        rows.append(dict(temperature=temp, verification="greedy" if temp == 0 else
                         "coupled race (seeded)" if seeded else "rejection sampling (unseeded)",
                         draft_tokens=m["draft_tokens"], acceptance_rate=m["acceptance_rate"],
                         acceptance_length=m["acceptance_length"]))
        print(json.dumps(rows[-1]), flush=True)
    results["spec_sampled"] = dict(model=args.mtp_model, prompts=n, decode_tokens=D, spec_tokens=args.spec_tokens,
                                   draft_mode=args.mtp_draft_mode, rows=rows)


def _corpus_acceptance(model_dir, n: int, spec_tokens: int, prompt_tokens: int = 32, decode_tokens: int = 48,
                       regex: str | None = None, draft_mode: str = "chain", stop_gap: float = 0.0,
                       compile_decode: bool = False):
    """Acceptance length and speed-up over n greedy continuations of n corpus snippets, one at a time (batch 1;
    one prompt is a noisy measure). The speed-up is total plain time / total speculative time, the two engines
    alternating prompt by prompt. ``regex``: both decode under that structured output. ``compile_decode``: both
    engines' decode steps compiled (on warm-up prompts, before timing)."""
    prompts = _corpus_prompts(model_dir, n, prompt_tokens)
    plain = Engine(model_dir, prompt_tokens + decode_tokens + 16, compile_decode=compile_decode)
    spec = Engine(model_dir, prompt_tokens + decode_tokens + 16, spec=spec_tokens, mtp_draft_mode=draft_mode,
                  spec_draft_stop_gap=stop_gap, compile_decode=compile_decode)
    # compiled: whole runs over a few prompts, for the rarer speculative step shapes the engine's start-up
    # compilation does not meet (benchmarks/engine.md §1)
    for p in prompts[:3 if compile_decode else 1]:
        plain.run(torch.tensor([p]), decode_tokens if compile_decode else 2)
        spec.run(torch.tensor([p]), decode_tokens if compile_decode else 2)
    spec.llm.engine.stats.update(spec_verify_steps=0, spec_draft_tokens=0, spec_accepted_tokens=0)
    t_plain = t_spec = 0.0
    same = True
    for p in prompts:
        tp, a = plain.run(torch.tensor([p]), decode_tokens, regex)
        ts, b = spec.run(torch.tensor([p]), decode_tokens, regex)
        t_plain, t_spec, same = t_plain + tp, t_spec + ts, same and a == b
    m = spec.llm.spec_metrics()
    row = dict(model=f"trained: {model_dir}", prompts=n, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
               spec_tokens=spec_tokens, draft_mode=draft_mode, stop_gap=stop_gap,
               drafts_per_step=m["draft_tokens"] / max(1, m["verify_steps"]), acceptance_length=m["acceptance_length"],
               acceptance_rate=m["acceptance_rate"],
               speedup=t_plain / t_spec, greedy_identical=same, regex=regex, compile_decode=compile_decode,
               plain_tok_s=n * decode_tokens / t_plain, spec_tok_s=n * decode_tokens / t_spec)
    print(json.dumps(row), flush=True)
    return row


def bench_mtp(args, path, cfg, results):
    out = {}
    D, k = args.mtp_decode_tokens, args.spec_tokens
    if args.mtp_model is not None:  # a checkpoint trained by glm5.train with --mtp-depth 3
        from glm5.config import GLM5Config

        c = GLM5Config.from_pretrained(args.mtp_model)
        ids = _prompts(1, args.mtp_context, c.vocab_size, seed=7)
        if (Path(args.mtp_model) / "tokenizer.json").exists() and args.mtp_prompt:
            from glm5.tokenizer import GLM5Tokenizer

            ids = torch.tensor([GLM5Tokenizer.from_pretrained(args.mtp_model).encode(args.mtp_prompt)])
        out["trained"] = _spec_point(f"trained: {args.mtp_model}", args.mtp_model, ids, D, k, args.repeats)
        if args.mtp_corpus_prompts:
            out["trained_corpus"] = _corpus_acceptance(args.mtp_model, args.mtp_corpus_prompts, k,
                                                       regex=args.mtp_regex, draft_mode=args.mtp_draft_mode,
                                                       stop_gap=args.spec_stop_gap,
                                                       compile_decode=args.compile_decode)
    for name in args.toy_presets:
        toy_dir = Path(args.workdir) / f"toy_{name}"
        if not (toy_dir / "config.json").exists():
            train_toy_mtp(toy_dir, name, args.toy_steps)
        ids = 1 + (5 + 2 * torch.arange(12)[None]) % (TOY_V - 1)  # a progression with step 2
        out[f"toy_{name}"] = _spec_point(f"{name} trained {args.toy_steps} steps on progressions (toy)", toy_dir,
                                         ids, D, k, args.repeats)
    out["random"] = _spec_point(f"random-init {args.preset}", path, _prompts(1, args.mtp_context, cfg.vocab_size, 7),
                                min(D, 32), k, args.repeats)
    results["mtp"] = out


def bench_dsa(args, results):
    """One MLA + DSA layer at GLM-5's attention shapes; cost of the attention over a T-token latent cache for a
    single decoded token (projections excluded: they are identical in both modes). Measured with the cache in
    fp32 (the CPU default, key "dsa") and in GLM-5's FP8 layouts (``kv_cache_dtype="fp8"``, key "dsa_fp8")."""
    from glm5.engine.kv_cache import PagedKVCache
    from glm5.engine.kv_quant import row_bytes
    from glm5.model.mla import MLAttention

    full = preset("glm5")
    cfg = full.replace(num_hidden_layers=1, hidden_size=1024, q_lora_rank=512)  # attention core dims as GLM-5
    T = args.dsa_context
    torch.manual_seed(0)
    with torch.device("meta"):
        attn = MLAttention(cfg, 0)
    attn = attn.to_empty(device="cpu")
    for prm in attn.parameters():
        torch.nn.init.normal_(prm, std=0.02)
    attn.eval()
    bs = 64
    h, r, dr = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    k, hi, di = cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim
    perm = torch.randperm(T // bs + 1)[: T // bs] + 1  # scattered blocks, as in a real paged cache
    kv_slots = (perm[:, None] * bs + torch.arange(bs)[None]).reshape(1, T)
    visible = torch.ones(1, 1, T, dtype=torch.bool)
    qn = torch.randn(1, 1, h, cfg.qk_nope_head_dim)
    qp = torch.randn(1, 1, h, dr)
    x = torch.randn(1, 1, cfg.hidden_size)
    q_resid = torch.randn(1, 1, cfg.q_lora_rank)
    cos, sin = torch.ones(1, 1, dr // 2), torch.zeros(1, 1, dr // 2)

    def timeit(fn, n):
        fn()
        best = float("inf")
        for _ in range(n):
            t = clock()
            fn()
            best = min(best, clock() - t)
        return best

    w_uk, w_uv = attn.absorbed_weights()
    o_lat = torch.randn(h, 1, r)

    @torch.inference_mode()
    def projections():  # q_nope·W_UK and o_lat·W_UVᵀ: per-token work identical in both modes (58 MB of fp32 weights)
        return torch.bmm(qn.reshape(1, h, -1).transpose(0, 1), w_uk), torch.bmm(o_lat, w_uv.transpose(1, 2))

    tp = timeit(projections, args.repeats * 3)
    flops_dense = 2 * h * T * ((r + dr) + r) + 2 * h * cfg.qk_nope_head_dim * r + 2 * h * r * cfg.v_head_dim
    flops_sparse = 2 * hi * di * T + 2 * hi * T + 2 * h * k * ((r + dr) + r) + 2 * h * cfg.qk_nope_head_dim * r \
        + 2 * h * r * cfg.v_head_dim
    for key, kv_dtype in (("dsa", "auto"), ("dsa_fp8", "fp8")):
        kv = PagedKVCache(cfg, T // bs + 2, bs, 1, torch.float32, "cpu", kv_cache_dtype=kv_dtype)
        slots = kv.num_blocks * bs
        if kv_dtype == "auto":
            kv.latent[0].normal_()
            kv.index[0].normal_()
            lat_row, idx_row = (r + dr) * 4, di * 4
        else:
            kv.latent[0].write(torch.arange(slots), torch.randn(slots, r), torch.randn(slots, dr))
            kv.index[0].write(torch.arange(slots), torch.randn(slots, di))
            lat_row, idx_row = row_bytes(r, dr), row_bytes(di)
        lat = kv.latent[0]

        @torch.inference_mode()
        def sparse(kv=kv, lat=lat):  # bound now: the loop rebinds kv and lat
            scores = attn.indexer.paged_scores(x, q_resid, cos, sin, kv.index[0], kv_slots, visible, kv.scratch)
            topk = attn.indexer.select(scores)
            return attn._absorbed_attention(qn, qp, lat, kv_slots, visible, topk, kv.scratch)

        @torch.inference_mode()
        def dense(kv=kv, lat=lat):
            return attn._absorbed_attention(qn, qp, lat, kv_slots, visible, None, kv.scratch)

        ts, td = timeit(sparse, args.repeats * 3), timeit(dense, args.repeats * 3)
        row = dict(context=T, kv_cache_dtype=kv_dtype, heads=h, kv_lora_rank=r, rope_dim=dr, index_heads=hi,
                   index_dim=di, index_topk=k, sparse_ms=ts * 1e3, dense_ms=td * 1e3, time_ratio=td / ts,
                   absorbed_projections_ms=tp * 1e3, time_ratio_excl_projections=(td - tp) / (ts - tp),
                   sparse_gflop=flops_sparse / 1e9, dense_gflop=flops_dense / 1e9, flop_ratio=flops_dense / flops_sparse,
                   bytes_read_sparse_mb=(T * idx_row + k * lat_row) / 2**20, bytes_read_dense_mb=T * lat_row / 2**20,
                   cache_bytes_per_token=lat_row + idx_row)
        print(json.dumps(row), flush=True)
        results[key] = row
        del kv, lat, sparse, dense  # the closures hold the cache too


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=["decode", "mtp", "dsa", "gpu"],
                    choices=["decode", "mtp", "specbatch", "specsampled", "dsa", "gpu", "gpumtp"])
    ap.add_argument("--preset", default="glm5-small")
    ap.add_argument("--contexts", type=int, nargs="*", default=[128, 1024])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compare-row-layout", action="store_true",
                    help="decode: also time the engine with cpu_weight_layout='row' (tuning off), interleaved")
    ap.add_argument("--compare-compiled", action="store_true",
                    help="decode: also time the engine with compile_decode=True (torch.compile'd decode steps)")
    ap.add_argument("--compare-packed-head", action="store_true",
                    help="decode: also time the engine (compiled, with --compare-compiled) without the LM head packed "
                         "for oneDNN (glm5/engine/cpu_layout.py), interleaved")
    ap.add_argument("--compile-decode", action="store_true",
                    help="with --mtp-corpus-prompts: both engines with compile_decode=True")
    ap.add_argument("--max-batched-tokens", type=int, default=4096,
                    help="engine per-step token budget (prompts longer than this are prefilled in chunks)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--wall", action="store_true", help="time with the wall clock instead of process CPU time")
    ap.add_argument("--spec-tokens", type=int, default=3)
    ap.add_argument("--mtp-model", default=None, help="checkpoint with a trained MTP layer (glm5 train --mtp-depth 3)")
    ap.add_argument("--toy-presets", nargs="*", default=["glm5-tiny"],
                    help="presets to train on the progression toy task for the MTP section")
    ap.add_argument("--toy-steps", type=int, default=60)
    ap.add_argument("--mtp-context", type=int, default=64)
    ap.add_argument("--mtp-decode-tokens", type=int, default=64)
    ap.add_argument("--mtp-prompt", default=None, help="text prompt for the trained model (needs its tokenizer)")
    ap.add_argument("--mtp-draft-mode", default="chain", choices=["chain", "recursive"],
                    help="MTP drafts 2..k: chained one-row steps (the engine's default) or the trained recursion")
    ap.add_argument("--spec-stop-gap", type=float, default=0.0,
                    help="with --mtp-corpus-prompts: EngineConfig.spec_draft_stop_gap of the speculative engine")
    ap.add_argument("--mtp-regex", default=None, metavar="PATTERN",
                    help="with --mtp-corpus-prompts: decode under this regex structured output (both engines)")
    ap.add_argument("--mtp-corpus-prompts", type=int, default=0,
                    help="also measure the trained model's acceptance over N prompts drawn from the default corpus")
    ap.add_argument("--spec-batch-prompts", type=int, default=16, help="specbatch: prompts submitted together")
    ap.add_argument("--spec-disable-batch-size", type=int, default=2, help="specbatch: the pause threshold")
    ap.add_argument("--dsa-context", type=int, default=32768)
    ap.add_argument("--gpu-preset", default="glm5-small")
    ap.add_argument("--gpu-context", type=int, default=1024)
    ap.add_argument("--gpu-override", nargs="*", default=[], metavar="FIELD=INT",
                    help="config overrides for the GPU model, e.g. num_hidden_layers=6 n_routed_experts=64 (GLM-5's "
                         "widths with fewer layers and experts: a decode step that reads GBs, so the roofline is "
                         "about memory, not kernel launches)")
    ap.add_argument("--gpu-compile", action="store_true",
                    help="GPU: also time decode graphs captured over a torch.compile'd forward (compile_decode)")
    ap.add_argument("--gpu-profile", metavar="TXT", help="GPU: append a profile of eager decode steps to this file")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(Path(__file__).with_name("engine.json")))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    global clock, MAX_BATCHED_TOKENS
    MAX_BATCHED_TOKENS = args.max_batched_tokens
    torch.set_num_threads(args.threads)
    if args.wall:
        clock = time.perf_counter
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_engine_")
    results = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=" ".join(sys.argv),
                   machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
                           f"{torch.__version__}, {torch.get_num_threads()} threads",
                   clock="wall" if args.wall else "process CPU time", preset=args.preset, dtype="float32")
    cfg = preset(args.preset)
    path = Path(args.workdir) / args.preset
    if "decode" in args.only or "mtp" in args.only:
        GLM5ForCausalLM(cfg).init_weights(0).save_pretrained(path)
    if "decode" in args.only:
        bench_decode(args, path, cfg, results)
    if "mtp" in args.only:
        bench_mtp(args, path, cfg, results)
    if "specbatch" in args.only:
        bench_spec_batch(args, results)
    if "specsampled" in args.only:
        bench_spec_sampled(args, results)
    if "dsa" in args.only:
        bench_dsa(args, results)
    if "gpu" in args.only:
        bench_gpu(args, results, _prompts)
    if "gpumtp" in args.only:  # MTP at batch 1 on the GPU, with and without CUDA graphs
        from gpu_mtp import bench_gpu_mtp

        bench_gpu_mtp(args, results, train_toy_mtp)
    out = Path(args.out)  # a list of runs: each invocation appends its own
    runs = json.loads(out.read_text()).get("runs", []) if out.exists() else []
    out.write_text(json.dumps({"runs": runs + [results]}, indent=2) + "\n")
    print(f"appended this run to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
