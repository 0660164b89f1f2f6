"""``glm5 generate`` (one prompt, streamed to the terminal) and ``glm5 chat`` (interactive, GLM-5 chat format).

    glm5 generate --model ckpt --prompt "Once upon a time" --max-tokens 64 --temperature 0.8
    glm5 generate --model ckpt --prompt-ids 1,2,3 --max-tokens 16          # no tokenizer needed
    glm5 chat --model ckpt --system "You are terse." --no-thinking
    glm5 generate --model ckpt --chat --prompt "A person, as JSON" --json-schema person.json   # structured output
    torchrun --nproc-per-node 2 -m glm5.cli generate --model ckpt --tensor-parallel-size 2 --prompt "Hi"  # 2 ranks

Both run the inference engine (paged latent cache, DSA, optional MTP speculation with --spec-tokens).
"""

from __future__ import annotations

import os
import sys
import time


def _engine_args(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="auto: the checkpoint's own; default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--fp8", default="dequantize", choices=["dequantize", "keep"],
                   help="an FP8 checkpoint's weights: dequantised at load (default) or kept FP8 (half the memory)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--spec-tokens", "--num-speculative-tokens", type=int, default=0,
                   help="MTP speculative draft tokens per step (0 = off)")
    p.add_argument("--spec-stop-gap", type=float, default=0.0,
                   help="greedy decoding stops drafting after a draft whose two best MTP logits are closer than this "
                        "(0 = always draft --spec-tokens; e.g. 0.1 with 10 drafts)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3", "fp8_ds_mla"],
                   help="auto: the KV cache in the model's dtype; fp8: GLM-5's FP8 layouts (656 + 132 bytes per token "
                        "and layer at GLM-5's widths, 1.8x the tokens of a bf16 cache; outputs then differ slightly)")
    p.add_argument("--dsa", default="sparse", choices=["sparse", "dense"])
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: decode without CUDA graphs (vLLM's flag)")
    p.add_argument("--compile-decode", action="store_true",
                   help="torch.compile the decode step (fused kernels). CUDA: before capturing its graphs, "
                        "1.2-1.7x faster decode on an H100, ~1 minute of compilation per batch bucket; CPU: 1.5-1.7x "
                        "faster decode at small batches, a few minutes of compilation when the engine starts")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the weights over N ranks: run under `torchrun --nproc-per-node N` (generate only; "
                        "rank 0 prints)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="with --tensor-parallel-size: deal the routed experts out whole instead of splitting each")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="default: 0 for generate, 1.0 for chat")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json-schema", default=None, metavar="FILE_OR_JSON",
                     help="structured output: the answer is a JSON document this schema accepts (a .json file or "
                          "the schema's text)")
    fmt.add_argument("--json-object", action="store_true", help="structured output: the answer is one JSON object")
    fmt.add_argument("--choice", action="append", default=None, metavar="TEXT",
                     help="structured output: the answer is exactly one of these strings (repeatable)")
    fmt.add_argument("--grammar", default=None, metavar="FILE_OR_GBNF",
                     help="structured output: the answer is a sentence of this GBNF grammar (a file, e.g. "
                          "json.gbnf, or the grammar's text; start rule root)")
    fmt.add_argument("--regex", default=None, metavar="PATTERN",
                     help="structured output: the whole answer matches this regular expression (Python syntax, "
                          "ASCII \\d \\w \\s)")
    fmt.add_argument("--structural-tag", default=None, metavar="FILE_OR_JSON",
                     help="structured output: free text in which each trigger starts a tag checked against its schema "
                          "(vLLM's {\"structures\": [{\"begin\", \"schema\", \"end\"}], \"triggers\": [...]} "
                          "or xgrammar's {\"format\": ...}; a .json file or the JSON text)")
    p.add_argument("--stats", action="store_true", help="print tokens/s (and MTP acceptance) to stderr")


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate from one prompt, streaming to the terminal")
    _engine_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (raw; add --chat to wrap it in the chat format)")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids (no tokenizer needed)")
    g.add_argument("--chat", action="store_true", help="render --prompt as one user turn of the GLM-5 chat format")
    g.add_argument("--no-thinking", action="store_true", help="with --chat: enable_thinking=false")
    g.set_defaults(func=run_generate)
    c = sub.add_parser("chat", help="interactive chat in the GLM-5 chat format")
    _engine_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--no-thinking", action="store_true", help="enable_thinking=false")
    c.add_argument("--hide-reasoning", action="store_true", help="do not print the reasoning text")
    c.set_defaults(func=run_chat)


def _build(args):
    from glm5.engine.llm import build_engine

    kw = {}
    if args.max_model_len:
        kw["max_model_len"] = args.max_model_len
    return build_engine(args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype, fp8=args.fp8,
                        max_num_seqs=1,
                        num_speculative_tokens=args.spec_tokens, spec_draft_stop_gap=args.spec_stop_gap,
                        dsa=args.dsa, kv_cache_dtype=args.kv_cache_dtype,
                        use_cuda_graph=not args.enforce_eager, compile_decode=args.compile_decode,
                        tensor_parallel_size=args.tensor_parallel_size,
                        enable_expert_parallel=args.enable_expert_parallel, **kw)


def _structured(args):
    from pathlib import Path

    from glm5.engine.sampling_params import StructuredOutputsParams

    if args.json_object:
        return StructuredOutputsParams(json_object=True)
    if args.choice:
        return StructuredOutputsParams(choice=args.choice)
    if args.regex is not None:
        return StructuredOutputsParams(regex=args.regex)  # an unsupported pattern: ValueError when added
    if args.grammar is not None:
        text = args.grammar
        if "::=" not in text:  # a path (a grammar's text has rules)
            text = Path(text).read_text(encoding="utf-8")  # OSError: one line from glm5's main
        return StructuredOutputsParams(grammar=text)
    for name in ("structural_tag", "json_schema"):
        text = getattr(args, name)
        if text is None:
            continue
        if not text.lstrip().startswith("{"):  # a path (a schema's or a structural tag's text is an object)
            text = Path(text).read_text(encoding="utf-8")  # OSError: one line from glm5's main
        # ValueError for text that is not JSON; a spec the grammar cannot take fails when the request is added
        return StructuredOutputsParams(**{"json" if name == "json_schema" else name: text})
    return None


def _params(args, default_temperature: float, stop_ids=None):
    from glm5.engine.sampling_params import SamplingParams

    t = default_temperature if args.temperature is None else args.temperature
    return SamplingParams(temperature=t, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
                          seed=args.seed, stop=args.stop, stop_token_ids=stop_ids, ignore_eos=args.ignore_eos,
                          skip_special_tokens=False, structured_outputs=_structured(args))


def _stream(engine, prompt, params, on_text, out=sys.stdout):
    """Run one request to completion, calling on_text(delta_text, delta_ids) as tokens arrive."""
    rid = engine.add_request(prompt, params)
    final = None
    t0 = time.perf_counter()
    first = None
    try:
        while engine.has_unfinished_requests():
            for o in engine.step(delta=True):
                if o.request_id != rid:
                    continue
                c = o.outputs[0]
                if c.token_ids and first is None:
                    first = time.perf_counter()
                on_text(c.text, c.token_ids)
                if o.finished:
                    final = o
    except KeyboardInterrupt:
        engine.abort(rid)
        out.write("\n[interrupted]\n")
    return final, t0, first


def _report(engine, final, t0, first, n_tokens) -> None:
    dt = time.perf_counter() - t0
    msg = f"[{n_tokens} tokens in {dt:.2f}s"
    if first is not None and n_tokens > 1:
        msg += f", {(n_tokens - 1) / max(1e-9, time.perf_counter() - first):.1f} tok/s after the first"
    if final is not None:
        msg += f", finish={final.outputs[0].finish_reason}"
    if engine.proposer is not None:
        m = engine.spec_metrics()
        msg += f", MTP acceptance length {m['acceptance_length']:.2f}"
    print(msg + "]", file=sys.stderr)


def run_generate(args) -> int:
    engine = _build(args)
    if engine.tp.rank != 0:  # every rank computes the same tokens; one prints them
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of this process)
    tok = engine.tokenizer
    if args.prompt_ids is not None:
        prompt = [int(x) for x in args.prompt_ids.replace(" ", "").split(",") if x]
    else:
        if tok is None:
            print("glm5 generate: no tokenizer.json in the model directory; pass --tokenizer or --prompt-ids",
                  file=sys.stderr)
            return 2
        prompt = args.prompt
        if args.chat:
            prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                             enable_thinking=not args.no_thinking)
    stop_ids = tok.stop_token_ids if (tok is not None and args.chat) else None
    params = _params(args, 0.0, stop_ids)
    count = [0]

    def on_text(text, ids):
        count[0] += len(ids)
        if tok is not None:
            sys.stdout.write(text)
        else:
            sys.stdout.write("".join(f"{i} " for i in ids))
        sys.stdout.flush()

    final, t0, first = _stream(engine, prompt, params, on_text)
    sys.stdout.write("\n")
    if args.stats:
        _report(engine, final, t0, first, count[0])
    return 0


_CHAT_HELP = ("/reset clears the conversation, /exit (or Ctrl-D) quits, /help shows this; "
              "anything else is your message.")


def run_chat(args) -> int:
    from glm5.tokenizer import StreamingParser

    if args.tensor_parallel_size > 1:  # each rank would read its own terminal; one driver process is needed
        print("glm5 chat: --tensor-parallel-size > 1 is not supported interactively; use glm5 generate under torchrun",
              file=sys.stderr)
        return 2
    engine = _build(args)
    tok = engine.tokenizer
    if tok is None:
        print("glm5 chat: needs a tokenizer (tokenizer.json in the model directory or --tokenizer)", file=sys.stderr)
        return 2
    thinking = not args.no_thinking
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    params = _params(args, 1.0, tok.stop_token_ids)
    print("glm5 chat: " + _CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = input("\n>>> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if line.strip() in ("/help", "/?"):
            print(_CHAT_HELP, file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt = tok.apply_chat_template(history, add_generation_prompt=True, enable_thinking=thinking)
        parser = StreamingParser(thinking=thinking)
        state = {"kind": None, "n": 0}

        def show(deltas):
            for d in deltas:
                if d.reasoning_content is not None:
                    if args.hide_reasoning:
                        continue
                    if state["kind"] != "reasoning":
                        sys.stdout.write("[thinking] ")
                        state["kind"] = "reasoning"
                    sys.stdout.write(d.reasoning_content)
                elif d.content is not None:
                    if state["kind"] == "reasoning":
                        sys.stdout.write("\n[answer] ")
                    state["kind"] = "content"
                    sys.stdout.write(d.content)
                else:
                    for tc in d.tool_calls or []:
                        sys.stdout.write(f"\n[tool call {tc.name or ''}] {tc.arguments or ''}")
            sys.stdout.flush()

        def on_text(text, ids):
            state["n"] += len(ids)
            show(parser.feed(text))

        try:
            final, t0, first = _stream(engine, prompt, params, on_text)
        except ValueError as e:  # e.g. the conversation no longer leaves room for the answer: say so, keep chatting
            print(f"glm5 chat: {e} (/reset starts over)", file=sys.stderr)
            history.pop()
            continue
        show(parser.finish())
        sys.stdout.write("\n")
        result = parser.result()
        history.append({"role": "assistant", "content": result.content or "",
                        **({"reasoning_content": result.reasoning_content} if result.reasoning_content else {})})
        if args.stats:
            _report(engine, final, t0, first, state["n"])
