"""``glm5 serve``: the OpenAI-compatible server over the glm5 engine.

    glm5 serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--served-model-name NAME]

Binds to loopback unless ``--host`` says otherwise. The key can also come from ``GLM5_API_KEY`` (keeps
it out of the process list).

For an RL trainer that drives this server as its rollout engine (verl / OpenRLHF as with vLLM, slime as with
SGLang): ``--enable-sleep-mode`` adds /sleep, /wake_up, /is_sleeping and /reset_prefix_cache, and
``--enable-weight-updates`` adds /update_weights_from_disk (glm5/serve/admin.py). Both are off by default: they
change what the server holds for every client, and the weight update reads any directory it is given. Under
``--tensor-parallel-size N`` they act on every rank (rank 0 announces each operation to the others).
"""

from __future__ import annotations

import argparse
import logging
import os

from .settings import PRICE_CACHED_INPUT, PRICE_INPUT, PRICE_OUTPUT, ServeSettings


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, metrics, web chat)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("GLM5_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $GLM5_API_KEY, else open)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: the --model argument as given, as in vLLM)")
    g = p.add_argument_group("engine")
    g.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=32, help="sequences per engine batch")
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--num-speculative-tokens", "--spec-tokens", type=int, default=0,
                   help="MTP drafts per step (0 = off)")
    g.add_argument("--spec-stop-gap", type=float, default=0.0,
                   help="greedy requests stop drafting after a draft whose two best MTP logits are closer than this "
                        "(0 = always draft --num-speculative-tokens; e.g. 0.1 with 10 drafts)")
    g.add_argument("--spec-disable-batch-size", type=int, default=0,
                   help="pause MTP drafting while more sequences than this run (0 = never; vLLM's disable_by_batch_size)")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 | auto (the checkpoint's own; default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    g.add_argument("--fp8", default="dequantize", choices=["dequantize", "keep"],
                   help="an FP8 checkpoint's weights: dequantised at load (default) or kept FP8 (half the memory)")
    g.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                   help="default temperature / top_p for requests that set none: 'auto' takes them from the model's "
                        "generation_config.json (GLM-5: 1.0 / 0.95, also used where the file has none), 'vllm' uses "
                        "1.0 / 1.0, a directory its generation_config.json (vLLM's flag)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the weights over N ranks: launch with `torchrun --nproc-per-node N -m glm5.cli serve "
                        "...`; rank 0 serves, the others run its model calls on their shards")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="with --tensor-parallel-size: deal the routed experts out whole instead of splitting each")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3", "fp8_ds_mla"],
                   help="auto: the KV cache in the model's dtype; fp8: GLM-5's FP8 layouts (656 + 132 bytes per token "
                        "and layer at GLM-5's widths, 1.8x the tokens of a bf16 cache; outputs then differ slightly)")
    g.add_argument("--enforce-eager", action="store_true", help="CUDA: decode without CUDA graphs (vLLM's flag)")
    g.add_argument("--compile-decode", action="store_true",
                   help="torch.compile the decode step (fused kernels). CUDA: before capturing its graphs, "
                        "1.2-1.7x faster decode on an H100, ~1 minute of compilation per batch bucket; CPU: 1.5-1.7x "
                        "faster decode at small batches, a few minutes of compilation when the engine starts")
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                   help="priority: requests' `priority` field orders the queue (lower first), as in vLLM")
    g.add_argument("--logprobs-mode", default="raw_logprobs", choices=["raw_logprobs", "processed_logprobs"],
                   help="logprobs of the model's distribution, or of the one each token was sampled from "
                        "(temperature, top-k/top-p, processors), as RL rollouts need")
    s = p.add_argument_group("serving")
    s.add_argument("--price-input", type=float, default=PRICE_INPUT, help="USD per million input tokens")
    s.add_argument("--price-output", type=float, default=PRICE_OUTPUT, help="USD per million output tokens")
    s.add_argument("--price-cached-input", type=float, default=PRICE_CACHED_INPUT,
                   help="USD per million prompt tokens served from the prefix cache")
    s.add_argument("--max-pending-requests", type=int, default=256, help="in-flight requests before 429")
    s.add_argument("--max-request-bytes", type=int, default=8 << 20, help="larger bodies get 413")
    s.add_argument("--max-default-tokens", type=int, default=None,
                   help="max_tokens when a request gives none (default: the rest of the context)")
    s.add_argument("--no-webchat", action="store_true", help="do not serve the web chat at /")
    s.add_argument("--enable-sleep-mode", action="store_true",
                   help="RL: POST /sleep?level=1|2, POST /wake_up, GET /is_sleeping, POST /reset_prefix_cache "
                        "(vLLM's routes; off by default)")
    s.add_argument("--enable-weight-updates", action="store_true",
                   help="RL: POST /update_weights_from_disk {model_path, abort_all_requests} loads a checkpoint of the "
                        "same architecture in place (SGLang's route; off by default; reads any directory it is given)")
    s.add_argument("--log-level", default="info")
    p.set_defaults(func=run)


def settings_from_args(args) -> ServeSettings:
    # vLLM's rule: without --served-model-name the API name is the --model argument as given (a basename would
    # call every ``OUT/hf`` checkpoint "hf")
    names = args.served_model_name or [args.model]
    return ServeSettings(
        served_model_names=names, api_key=args.api_key or None, price_input_per_million=args.price_input,
        price_output_per_million=args.price_output, price_cached_input_per_million=args.price_cached_input,
        max_pending_requests=args.max_pending_requests, max_request_bytes=args.max_request_bytes,
        max_default_tokens=args.max_default_tokens, enable_webchat=not args.no_webchat)


def sampling_defaults(settings: ServeSettings, generation_config: str, model) -> ServeSettings:
    """``settings`` with the request defaults ``--generation-config`` names: the model's generation_config.json
    ("auto"), another directory's, or vLLM's neutral 1.0 / 1.0 ("vllm")."""
    import dataclasses
    import json
    from pathlib import Path

    if generation_config == "vllm":
        return dataclasses.replace(settings, default_temperature=1.0, default_top_p=1.0)
    if generation_config == "auto":
        gen = getattr(model, "generation_config", {})
    else:
        f = Path(generation_config) / "generation_config.json"
        try:
            gen = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--generation-config: cannot read {f}: {e}") from None
    fields = {}
    for key, name in (("temperature", "default_temperature"), ("top_p", "default_top_p")):
        if key in gen:
            v = gen[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (key == "top_p" and not 0 < v <= 1):
                raise ValueError(f"generation_config.json: {key} must be a number in range, got {v!r}")
            fields[name] = float(v)
    return dataclasses.replace(settings, **fields)


def build_app(model_dir: str, settings: ServeSettings, generation_config: str = "auto", admin_options=None,
              **engine_kwargs):
    """A ready app for ``model_dir``; ``engine_kwargs`` are EngineConfig fields plus device/dtype; ``admin_options``
    a glm5.serve.admin.AdminOptions (the RL routes; none by default)."""
    from .app import create_app
    from .backend import EngineBackend

    backend = EngineBackend.from_pretrained(model_dir, **{k: v for k, v in engine_kwargs.items() if v is not None})
    return create_app(backend, sampling_defaults(settings, generation_config, backend.engine.model), admin_options)


def admin_options_from_args(args):
    from .admin import AdminOptions

    return AdminOptions(sleep_mode=args.enable_sleep_mode, weight_updates=args.enable_weight_updates)


def run(args) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    admin_options = admin_options_from_args(args)
    app = build_app(args.model, settings, generation_config=args.generation_config, admin_options=admin_options,
                    max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens,
                    num_speculative_tokens=args.num_speculative_tokens,
                    spec_disable_batch_size=args.spec_disable_batch_size, spec_draft_stop_gap=args.spec_stop_gap,
                    dtype=args.dtype, device=args.device,
                    kv_cache_memory=args.kv_cache_memory, fp8=args.fp8, seed=args.seed, logprobs_mode=args.logprobs_mode,
                    tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
                    scheduling_policy=args.scheduling_policy, use_cuda_graph=not args.enforce_eager,
                    compile_decode=args.compile_decode, kv_cache_dtype=args.kv_cache_dtype)
    engine = app.state.serve.backend.engine
    if engine.tp.world > 1:  # rank 0 serves and drives; the other ranks run its model calls (glm5.engine.parallel)
        from glm5.engine.parallel import drive, follow, heartbeat_interval

        if engine.tp.rank != 0:
            # the admin operations rank 0 announces (glm5/serve/admin.py: each rank does its part, then they agree)
            handlers = None
            if admin_options.any:
                from .admin import follower_handlers

                handlers = follower_handlers(engine)
            follow(engine.runner, engine.tp, handlers)
            return 0
        drive(engine.runner, engine.tp, heartbeat_s=heartbeat_interval())  # idle followers must not time out
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        logging.getLogger("glm5.serve").warning("listening on %s without an API key", args.host)
    if admin_options.any and not settings.api_key:
        logging.getLogger("glm5.serve").warning("admin routes (sleep / weight updates) are on without an API key: "
                                                "anyone who can reach the port can use them")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=5)
    finally:
        from glm5.engine.parallel import release_followers

        release_followers(engine.tp)
    return 0
