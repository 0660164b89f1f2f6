"""The rollout side: multi-turn generation on our engine, rewards, and the rollout worker process.

:class:`RolloutEngine` drives a ``glm5.engine.LLMEngine`` at step level (``add_request`` / ``step`` /
``abort``), so samples join and leave the running batch continuously (the engine's continuous batching) and
generation can be interrupted at any step boundary:

* ``submit(samples)`` adds one engine request per sample, for the prompt plus whatever response the sample
  already has (a resumed partial rollout, or the next turn of a tool-using trajectory), with ``max_tokens`` =
  the sample's remaining budget; the engine's current weight version is appended to ``weight_versions``;
* ``step()`` runs one engine step and returns the samples that finished, with rewards;
* ``abort_all()`` interrupts every running request and returns the samples with their partial responses
  (status ABORTED): the data buffer queues them to resume later (partial rollouts);
* ``load_weights(named, version)`` loads new weights in place (see weight_sync.apply_to_engine).

Multi-turn tool use in GLM-5's chat format, token-in/token-out: the model's turn ends with ``<|observation|>``
(an EOS id) after ``<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>``; the turn's
tokens are appended with loss mask 1 and their engine log-probs; the calls are parsed
(``glm5.tokenizer.parse_output``), run, and ``<tool_response>result</tool_response>...<|assistant|><think>``
is appended with loss mask 0 (what the chat template renders for the tool message and the next generation
prompt), then generation continues. Model output is never re-tokenised.

:func:`rollout_worker_main` is the rollout process: it builds the engine from a checkpoint directory and serves
a control queue (submit / abort / weight update / stop) while stepping the engine; finished samples stream
back on a result queue. :class:`ProcessRolloutClient` (manager side) starts and talks to it;
:class:`LocalRolloutClient` has the same interface with the engine in the caller's process.
"""

from __future__ import annotations

import os
import queue
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from glm5.rl.rewards import as_reward_result, load_reward_fn
from glm5.rl.sample import Sample, Status
from glm5.rl.tasks import build_messages
from glm5.rl.tools import Tool, get_tools
from glm5.rl.weight_sync import apply_to_engine

__all__ = ["RolloutConfig", "RolloutEngine", "WorkerSpec", "rollout_worker_main", "LocalRolloutClient",
           "ProcessRolloutClient", "build_rollout_engine"]


@dataclass
class RolloutConfig:
    temperature: float = 1.0  # the trainer takes log-probs of softmax(z / T) with the same T
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128  # response budget per trajectory (model + tool tokens)
    max_turns: int = 1  # model turns per trajectory (> 1 only makes sense with tools)
    tools: list[str] = field(default_factory=list)
    reward: str = "abstention"
    seed: int | None = 0
    enable_thinking: bool = True
    system: str | None = None
    tool_timeout: float = 5.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Running:
    sample: Sample
    request_id: str


class RolloutEngine:
    """Sample-level rollout logic over an LLMEngine (see module docstring)."""

    def __init__(self, engine, tokenizer, cfg: RolloutConfig | None = None, tools: list[Tool] | None = None,
                 reward_fn: Callable | str | None = None):
        self.engine = engine
        self.tok = tokenizer
        self.cfg = cfg or RolloutConfig()
        self.tools = tools if tools is not None else get_tools(self.cfg.tools)
        self.tool_map = {t.name: t for t in self.tools}
        self.tool_schemas = [t.schema() for t in self.tools] or None
        self.reward_fn = load_reward_fn(reward_fn or self.cfg.reward)
        if not hasattr(engine, "weight_version"):
            engine.weight_version = 0
        self._running: dict[str, _Running] = {}
        self._done: list[Sample] = []  # finished, not yet handed out
        self._next = 0
        self.obs_id = tokenizer.token_to_id("<|observation|>")
        self.extra_stop = [i for i in (tokenizer.token_to_id(t) for t in ("<|assistant|>", "<|system|>"))
                           if i is not None]
        self.max_model_len = getattr(engine, "max_model_len", 1 << 30)
        self.stats = {"requests": 0, "tokens": 0, "tool_calls": 0, "finished": 0, "aborted": 0, "steps": 0}

    # ------------------------------------------------------------------------------------- helpers
    @property
    def version(self) -> int:
        return int(self.engine.weight_version)

    @property
    def has_work(self) -> bool:
        return bool(self._running)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def make_prompt(self, task: dict) -> list[int]:
        return self.tok.apply_chat_template(build_messages(task, self.cfg.system), tools=self.tool_schemas,
                                            add_generation_prompt=True, enable_thinking=self.cfg.enable_thinking,
                                            tokenize=True)

    def _params(self, s: Sample, budget: int):
        from glm5.engine import SamplingParams

        seed = None
        if self.cfg.seed is not None:
            key = f"{self.cfg.seed}/{s.group_id}/{s.index}/{len(s.response_ids)}/{s.resumed}".encode()
            seed = zlib.crc32(key) & 0x7FFFFFFF
        return SamplingParams(n=1, temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=self.cfg.top_k,
                              max_tokens=budget, seed=seed, logprobs=0, stop_token_ids=self.extra_stop,
                              skip_special_tokens=False)

    def load_weights(self, named, version: int) -> None:
        if self._running:
            raise RuntimeError("abort running requests before loading weights")
        apply_to_engine(self.engine, named, version)

    # ------------------------------------------------------------------------------------ requests
    def submit(self, samples: list[Sample]) -> None:
        for s in samples:
            if not s.prompt_ids:
                s.prompt_ids = self.make_prompt(s.task)
            if s.max_new_tokens <= 0:
                s.max_new_tokens = self.cfg.max_new_tokens
            self._submit_one(s)

    def _submit_one(self, s: Sample) -> None:
        budget = min(s.remaining_tokens, self.max_model_len - len(s.tokens) - 1)
        if budget <= 0:
            if not s.response_ids:  # not one token fits: nothing to train on; a data/config problem, not a truncation
                s.status = Status.FAILED
                s.failure_reason = (f"the prompt is {len(s.prompt_ids)} tokens, which leaves no room to generate "
                                    f"under max_model_len {self.max_model_len}")
            else:
                s.status = Status.TRUNCATED
            self._finalize(s)
            self._done.append(s)
            return
        rid = f"r{self._next}"
        self._next += 1
        s.status = Status.PENDING
        s.weight_versions.append(self.version)
        self.engine.add_request(list(s.tokens), self._params(s, budget), request_id=rid)
        self._running[rid] = _Running(s, rid)
        self.stats["requests"] += 1

    def take_done(self) -> list[Sample]:
        done, self._done = self._done, []
        return done

    def step(self) -> list[Sample]:
        """One engine step; returns samples that finished (reward computed), including any that finished
        without an engine step (no budget left at submission)."""
        if self._running:
            outs = self.engine.step()
            self.stats["steps"] += 1
            for out in outs:
                if out.finished and out.request_id in self._running:
                    run = self._running.pop(out.request_id)
                    _count_spec(run.sample, out.metrics)
                    self._turn_done(run.sample, out.outputs[0])
        return self.take_done()

    def _append_model_tokens(self, s: Sample, comp) -> None:
        toks = list(comp.token_ids)
        if comp.logprobs is None or len(comp.logprobs) < len(toks):
            raise RuntimeError("engine returned no per-token log-probs")
        lps = [float(d[t]) for d, t in zip(comp.logprobs, toks)]
        s.append(toks, lps, trainable=True)
        self.stats["tokens"] += len(toks)

    def _turn_done(self, s: Sample, comp) -> None:
        try:
            self._append_model_tokens(s, comp)
            s.num_turns += 1
            reason = comp.finish_reason
            if reason == "stop" and comp.stop_reason == self.obs_id and self.tools and s.num_turns < self.cfg.max_turns:
                if self._run_tools(s, comp.token_ids):
                    self._submit_one(s)
                    return
            if reason == "error":  # the engine could not sample this trajectory (e.g. non-finite logits)
                raise RuntimeError(f"generation failed: {comp.stop_reason}")
            s.status = Status.TRUNCATED if reason == "length" else Status.COMPLETED
        except Exception as e:  # an environment failure must not kill the rollout process
            s.status = Status.FAILED
            s.failure_reason = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        self._finalize(s)
        self._done.append(s)

    def _run_tools(self, s: Sample, turn_ids: list[int]) -> bool:
        """Parse the turn's tool calls, run them, append the observation (masked). False if there are none."""
        from glm5.tokenizer import parse_output

        parsed = parse_output(self.tok.decode(turn_ids), self.tool_schemas, thinking=self.cfg.enable_thinking)
        if not parsed.tool_calls:
            return False
        results = []
        for call in parsed.tool_calls:
            tool = self.tool_map.get(call.name)
            results.append(tool(call.arguments) if tool is not None else f"Error: unknown tool {call.name!r}")
        s.tool_calls += len(results)
        self.stats["tool_calls"] += len(results)
        obs = "".join(f"<tool_response>{r}</tool_response>" for r in results)
        obs += "<|assistant|>" + ("<think>" if self.cfg.enable_thinking else "</think>")
        ids = self.tok.encode(obs)
        if len(ids) >= s.remaining_tokens:
            return False  # no room left to answer: end the trajectory here (it will score as unanswered)
        s.append(ids, None, trainable=False)
        return True

    def _finalize(self, s: Sample) -> None:
        s.check()
        s.response_text = self.tok.decode(s.response_ids)
        try:
            r = as_reward_result(self.reward_fn(s.response_text, s.task), s.response_text, s.task)
        except Exception as e:
            s.status = Status.FAILED
            s.failure_reason = f"reward: {type(e).__name__}: {e}"
            r = as_reward_result(0.0, s.response_text, s.task)
        s.reward = float(r.reward)
        s.reward_info = r.to_dict()
        self.stats["finished"] += 1

    def abort_all(self) -> list[Sample]:
        """Interrupt every running request; returns the samples with their partial responses (ABORTED)."""
        out = []
        for rid, run in list(self._running.items()):
            res = self.engine.abort(rid)
            s = run.sample
            if res is not None:
                _count_spec(s, res.metrics)
            if res is not None and res.outputs:
                comp = res.outputs[0]
                if comp.token_ids:
                    self._append_model_tokens(s, comp)
            s.status = Status.ABORTED
            out.append(s)
            self.stats["aborted"] += 1
        self._running.clear()
        return out

    def generate(self, samples: list[Sample]) -> list[Sample]:
        """Blocking: run ``samples`` to completion (evaluation, sync mode in-process)."""
        self.submit(samples)
        done = self.take_done()
        while self._running:
            done.extend(self.step())
        return done


def _count_spec(s: Sample, metrics: dict) -> None:
    s.spec_verify_steps += int(metrics.get("spec_verify_steps", 0))
    s.spec_accepted_tokens += int(metrics.get("spec_accepted_tokens", 0))


# ------------------------------------------------------------------------------------ engine building
def build_rollout_engine(model_dir: str, *, tokenizer=None, device: str = "cpu", dtype: str = "float32",
                         engine_kwargs: dict | None = None, cfg: RolloutConfig | None = None,
                         model=None) -> RolloutEngine:
    """A RolloutEngine on a fresh LLMEngine for ``model_dir`` (or an already loaded ``model``)."""
    from glm5.engine import build_engine
    from glm5.tokenizer import GLM5Tokenizer

    tok = tokenizer if tokenizer is not None else GLM5Tokenizer.from_pretrained(model_dir)
    # the trainer's log-probs are of softmax(logits / T): the rollout reports the distribution it sampled from
    kw = {"logprobs_mode": "processed_logprobs", **(engine_kwargs or {})}
    engine = build_engine(model if model is not None else model_dir, tok, device=device,
                          dtype=None if model is not None else dtype, **kw)
    engine.weight_version = 0
    return RolloutEngine(engine, tok, cfg)


# ---------------------------------------------------------------------------------------- the process
@dataclass
class WorkerSpec:
    model_dir: str
    rollout: dict  # RolloutConfig fields
    engine_kwargs: dict = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    weight_transport: str = "shm"  # "shm" | "dist"
    dist: dict = field(default_factory=dict)  # host, port, rank, world_size, backend
    tokenizer_dir: str | None = None


def rollout_worker_main(spec: WorkerSpec, in_q, out_q, shm_sync=None) -> None:
    """Entry point of the rollout process (see module docstring). Messages in: ("submit", [Sample]),
    ("abort",), ("weights", version, abort_first), ("stats",), ("stop",). Messages out: ("ready", info),
    ("finished", [Sample], stats), ("aborted", [Sample]), ("weights_loaded", version, [Sample]), ("stats", d),
    ("error", text)."""
    _leave_signals_to_the_trainer()
    try:
        torch.set_num_threads(max(1, spec.threads))
        from glm5.tokenizer import GLM5Tokenizer

        tok = GLM5Tokenizer.from_pretrained(spec.tokenizer_dir or spec.model_dir)
        rollout = build_rollout_engine(spec.model_dir, tokenizer=tok, device=spec.device, dtype=spec.dtype,
                                       engine_kwargs=spec.engine_kwargs, cfg=RolloutConfig(**spec.rollout))
        receiver = None
        if spec.weight_transport == "dist":
            from glm5.rl.weight_sync import DistWeightReceiver

            d = spec.dist
            receiver = DistWeightReceiver(d["host"], d["port"], d.get("rank", 1), d["world_size"],
                                          d.get("backend", "gloo"), device=spec.device)
        if shm_sync is not None:
            shm_sync.local_version = 0
        out_q.put(("ready", {"pid": os.getpid(), "version": rollout.version}))
        busy = idle = 0.0
        last_check = time.perf_counter()
        while True:
            msgs = []
            t0 = time.perf_counter()
            if rollout.has_work:
                try:
                    while True:
                        msgs.append(in_q.get_nowait())
                except queue.Empty:
                    pass
                if time.perf_counter() - last_check > 1.0:
                    last_check = time.perf_counter()
                    if not _parent_alive():
                        return _orphaned(out_q)
            else:
                while True:  # idle: wait for work, but not past the trainer's death (SIGKILL leaves no "stop")
                    try:
                        msgs.append(in_q.get(timeout=1.0))
                        break
                    except queue.Empty:
                        if not _parent_alive():
                            break
                if not msgs:
                    return _orphaned(out_q)
                try:
                    while True:
                        msgs.append(in_q.get_nowait())
                except queue.Empty:
                    pass
                idle += time.perf_counter() - t0
            stop = False
            for m in msgs:
                kind = m[0]
                if kind == "submit":
                    rollout.submit(m[1])
                    done = rollout.take_done()
                    if done:
                        out_q.put(("finished", done, {}))
                elif kind == "abort":
                    out_q.put(("aborted", rollout.abort_all()))
                elif kind == "weights":  # m[1] is the pushed version; the receiver reads it from the payload
                    # in-flight requests hold latents of the old weights: interrupt them (partial rollouts)
                    partial = rollout.abort_all()
                    if receiver is not None:
                        receiver.recv(rollout.engine)
                    elif shm_sync is not None:
                        shm_sync.poll(rollout.engine)
                    out_q.put(("weights_loaded", rollout.version, partial))
                elif kind == "stats":
                    out_q.put(("stats", {**rollout.stats, "busy_s": busy, "idle_s": idle}))
                elif kind == "stop":
                    stop = True
            if stop:
                break
            if rollout.has_work:
                t1 = time.perf_counter()
                done = rollout.step()
                busy += time.perf_counter() - t1
                if done:
                    out_q.put(("finished", done, {"busy_s": busy, "idle_s": idle, "version": rollout.version}))
        out_q.put(("stopped", {**rollout.stats, "busy_s": busy, "idle_s": idle}))
    except BaseException:
        out_q.put(("error", traceback.format_exc()))
        raise


def _leave_signals_to_the_trainer() -> None:
    """A rollout process ignores SIGINT and SIGTERM: a terminal's Ctrl-C (sent to the whole process group) or a
    scheduler's SIGTERM (sent to every process of the job) must not kill it in the middle of the trainer's last
    step. The trainer stops gracefully and then stops this process ("stop"); were the trainer killed instead, the
    parent check below ends this process within a second. Only in a child process's main thread (a Ray actor runs
    this loop in a thread of its own)."""
    import multiprocessing
    import signal
    import threading

    if multiprocessing.parent_process() is None or threading.current_thread() is not threading.main_thread():
        return
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def _orphaned(out_q) -> None:
    """The trainer is gone: exit without waiting to flush anything to it."""
    out_q.cancel_join_thread()


def _parent_alive() -> bool:
    """False once the process that started this one has exited (killed trainers must not leave rollout workers
    holding a model and its KV cache). True where there is no parent to watch (not a multiprocessing child)."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()


# ---------------------------------------------------------------------------------------- clients
class LocalRolloutClient:
    """The rollout engine in the caller's process (tests, ``--colocate``); same interface as the process client.
    ``poll`` drives the engine itself."""

    def __init__(self, rollout: RolloutEngine):
        self.rollout = rollout
        self.version = rollout.version
        self.busy_s = 0.0

    def make_prompt(self, task: dict) -> list[int]:
        return self.rollout.make_prompt(task)

    def submit(self, samples: list[Sample]) -> None:
        self.rollout.submit(samples)

    def poll(self, timeout: float = 0.0) -> list[tuple]:
        t0 = time.perf_counter()
        done = self.rollout.take_done()
        if not done and self.rollout.has_work:
            done = self.rollout.step()
        self.busy_s += time.perf_counter() - t0
        return [("finished", done, {})] if done else []

    @property
    def has_work(self) -> bool:
        return self.rollout.has_work

    def abort(self) -> list[Sample]:
        return self.rollout.abort_all()

    def update_weights(self, model, version: int, abort: bool = True) -> list[Sample]:
        from glm5.rl.weight_sync import named_weights

        partial = self.rollout.abort_all()  # in-flight latents belong to the old weights
        self.rollout.load_weights(named_weights(model), version)
        self.version = version
        return partial

    def stats(self) -> dict:
        return {**self.rollout.stats, "busy_s": self.busy_s}

    def close(self) -> None:
        pass


class ProcessRolloutClient:
    """Starts the rollout worker process and talks to it (manager side).

    Alone, a client owns its weight transport (a shared-memory copy of the weights, or a two-rank
    torch.distributed group). In a ``RolloutPool`` the pool owns one transport for all workers: it passes the
    shared ``shm`` (or ``wait=False`` to create one broadcast group after every worker has started) and pushes
    weights once for all of them."""

    def __init__(self, spec: WorkerSpec, policy_model=None, make_prompt: Callable | None = None,
                 start_timeout: float = 300.0, *, shm=None, wait: bool = True):
        import torch.multiprocessing as mp

        from glm5.rl.weight_sync import SharedMemoryWeightSync

        ctx = mp.get_context("spawn")
        self.spec = spec
        self.in_q, self.out_q = ctx.Queue(), ctx.Queue()
        self.shm = shm
        self.sender = None
        if spec.weight_transport == "shm" and self.shm is None:
            if policy_model is None:
                raise ValueError("shared-memory weight sync needs the policy model")
            self.shm = SharedMemoryWeightSync(policy_model, 0, ctx)
        self.proc = ctx.Process(target=rollout_worker_main, args=(spec, self.in_q, self.out_q, self.shm), daemon=True,
                                name="glm5-rollout")
        self.proc.start()
        self._events: list[tuple] = []
        self.version = 0
        self._make_prompt = make_prompt
        self.last_stats: dict = {}
        if wait:
            if spec.weight_transport == "dist":
                from glm5.rl.weight_sync import DistWeightSender

                d = spec.dist
                self.sender = DistWeightSender(d["host"], d["port"], d["world_size"], d.get("backend", "gloo"))
            self.wait_ready(start_timeout)

    def wait_ready(self, timeout: float = 300.0) -> None:
        first = self._get(timeout)
        if first[0] != "ready":
            raise RuntimeError(f"rollout worker failed to start: {first}")

    def _get(self, timeout: float | None):
        """Next event within ``timeout`` seconds (queue.Empty otherwise); fails fast if the worker died."""
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while True:
            try:
                ev = self.out_q.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                break
            except queue.Empty:
                if not self.proc.is_alive():
                    try:  # its last words may still be in the queue
                        ev = self.out_q.get(timeout=0.5)
                        break
                    except queue.Empty:
                        raise RuntimeError(f"rollout worker died (exit code {self.proc.exitcode})") from None
                if time.monotonic() >= deadline:
                    raise
        if ev[0] == "error":
            raise RuntimeError("rollout worker failed:\n" + ev[1])
        return ev

    def check_alive(self) -> None:
        """Raise if the worker process has died (its last words, if any, are in the next event)."""
        if not self.proc.is_alive():
            try:
                self._events.append(self._get_nowait())
            except queue.Empty:
                raise RuntimeError(f"rollout worker died (exit code {self.proc.exitcode})") from None

    def make_prompt(self, task: dict) -> list[int]:
        if self._make_prompt is None:
            raise RuntimeError("no prompt builder")
        return self._make_prompt(task)

    def submit(self, samples: list[Sample]) -> None:
        if samples:
            self.in_q.put(("submit", samples))

    def poll(self, timeout: float = 0.0) -> list[tuple]:
        evs, self._events = self._events, []
        if not evs and timeout > 0:
            try:
                evs.append(self._get(timeout))
            except queue.Empty:
                pass
        while True:
            try:
                evs.append(self._get_nowait())
            except queue.Empty:
                break
        for ev in evs:
            if ev[0] == "finished" and ev[2]:
                self.last_stats.update(ev[2])
        return evs

    def _get_nowait(self):
        ev = self.out_q.get_nowait()
        if ev[0] == "error":
            raise RuntimeError("rollout worker failed:\n" + ev[1])
        return ev

    def _wait_for(self, kind: str, timeout: float = 600.0) -> tuple:
        deadline = time.monotonic() + timeout
        while True:
            ev = self._get(max(0.01, deadline - time.monotonic()))
            if ev[0] == kind:
                return ev
            self._events.append(ev)

    def abort(self) -> list[Sample]:
        self.request_abort()
        return self.await_abort()

    def request_abort(self) -> None:
        self.in_q.put(("abort",))

    def await_abort(self) -> list[Sample]:
        return self._wait_for("aborted")[1]

    def update_weights(self, model, version: int, abort: bool = True) -> list[Sample]:
        """Push weights with a version stamp; returns samples interrupted by the update."""
        if self.shm is not None:
            self.shm.push(model, version)
            self.request_weights(version, abort)
        else:  # the worker must be inside its receive before the broadcast starts
            self.request_weights(version, abort)
            self.sender.push(model, version)
        return self.await_weights(version)

    def request_weights(self, version: int, abort: bool = True) -> None:
        """Tell the worker to load ``version`` from the transport (pushed before, for shared memory)."""
        self.in_q.put(("weights", version, abort))

    def await_weights(self, version: int) -> list[Sample]:
        ev = self._wait_for("weights_loaded")
        if ev[1] != version:
            raise RuntimeError(f"rollout loaded version {ev[1]}, expected {version}")
        self.version = version
        return ev[2]

    def stats(self) -> dict:
        self.in_q.put(("stats",))
        return self._wait_for("stats")[1]

    def close(self, timeout: float = 30.0) -> None:
        if self.proc.is_alive():
            self.in_q.put(("stop",))
            self.proc.join(timeout)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
