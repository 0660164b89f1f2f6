"""The rollout engine: multi-turn generation on our engine, with rewards.

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

The engine runs in its own process (``glm5.rl.rollout_worker``) or in the caller's; the manager drives either
through a client (``glm5.rl.rollout_client``).
"""

from __future__ import annotations

import traceback
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from glm5.rl.rewards import as_reward_result, load_reward_fn
from glm5.rl.sample import Sample, Status
from glm5.rl.tasks import build_messages
from glm5.rl.tools import Tool, get_tools
from glm5.rl.weight_sync import apply_to_engine

__all__ = ["RolloutConfig", "RolloutEngine", "build_rollout_engine"]


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
