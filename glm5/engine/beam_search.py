"""Beam search over the engine, in vLLM's shape (``LLM.beam_search(prompts, BeamSearchParams(...))``).

As vLLM does, beam search is not a sampling mode inside the engine: each step submits every live beam as a prompt
for one token with its ``2 × beam_width`` most likely continuations, and keeps the best ``beam_width`` extensions by
cumulative log-probability. The prefix cache serves the part of each beam the previous step already computed, so a
step recomputes only the tail of the last, partly filled cache block. A beam that emits EOS is finished; at the end
the finished beams and the live ones are ranked by cumulative log-probability divided by length^length_penalty.

The search itself (:class:`BeamSearchState`, :func:`step_params`) knows nothing of the engine: :func:`beam_search`
drives it over a synchronous LLMEngine, ``glm5.serve.beam`` over the server's asyncio backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from glm5.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class BeamSearchParams:
    """beam_width: beams kept per prompt (and the completions returned). max_tokens: tokens generated at most.
    ignore_eos: EOS does not finish a beam. length_penalty: the final ranking divides the cumulative
    log-probability by (generated length)^length_penalty (1.0: per-token average; 0: the sum itself)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self):
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be a positive integer, got {self.beam_width!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")


@dataclass
class BeamSearchSequence:
    """One beam: ``tokens`` = prompt + generated ids, ``logprobs`` the chosen tokens' log-probabilities (generated
    part), ``cum_logprob`` their sum, ``text`` the generated text (filled for the returned beams)."""

    tokens: list[int]
    logprobs: list[float] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finished: bool = False


@dataclass
class BeamSearchOutput:
    """The ``beam_width`` best beams of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def step_params(beam_width: int) -> SamplingParams:
    """What each beam is submitted with at each step: one greedy token, with its ``2 × beam_width`` most likely
    alternatives (EOS is a candidate like any token: the search, not the engine, decides what ends a beam)."""
    return SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=2 * beam_width)


class BeamSearchState:
    """The search of one prompt, engine-free (the synchronous driver below and the server's asyncio one share it):
    ``live`` are the beams to submit next, :meth:`advance` takes their ``{token: logprob}`` continuations and keeps
    the best ``beam_width`` extensions; a beam ending in one of ``finish_ids`` (the EOS ids unless ``ignore_eos``,
    plus ``stop_ids``) is finished. :meth:`ranked` gives the final order."""

    def __init__(self, prompt: list[int], params: BeamSearchParams, eos_ids=(), stop_ids=()):
        self.params = params
        self.prompt_len = len(prompt)
        self.finish_ids = (set() if params.ignore_eos else set(eos_ids)) | set(stop_ids)
        self.live = [BeamSearchSequence(list(prompt))]
        self.done: list[BeamSearchSequence] = []
        self.steps = 0

    @property
    def running(self) -> bool:
        return bool(self.live) and self.steps < self.params.max_tokens

    def advance(self, tops: list[dict[int, float]]) -> None:
        """tops: one ``{token: logprob}`` per live beam, in ``live``'s order."""
        if len(tops) != len(self.live):
            raise ValueError(f"advance: {len(tops)} continuations for {len(self.live)} live beams")
        cands = [BeamSearchSequence(beam.tokens + [tok], beam.logprobs + [lp], beam.cum_logprob + lp)
                 for beam, top in zip(self.live, tops) for tok, lp in top.items()]
        cands.sort(key=lambda b: -b.cum_logprob)
        self.live = []
        for b in cands:  # the best extensions; one that ends with a finishing token is a finished beam
            if len(self.live) == self.params.beam_width:
                break
            if b.tokens[-1] in self.finish_ids:
                b.finished = True
                self.done.append(b)
            else:
                self.live.append(b)
        self.steps += 1

    def score(self, beam: BeamSearchSequence) -> float:
        return beam.cum_logprob / max(1, len(beam.tokens) - self.prompt_len) ** self.params.length_penalty

    def ranked(self) -> list[BeamSearchSequence]:
        """The ``beam_width`` best beams, finished and live, by cumulative log-probability / length^length_penalty."""
        return sorted(self.done + self.live, key=lambda b: -self.score(b))[:self.params.beam_width]

    def output_ids(self, beam: BeamSearchSequence) -> list[int]:
        """The beam's generated ids without the token that finished it (which is not part of the text)."""
        gen = beam.tokens[self.prompt_len:]
        return gen[:-1] if beam.finished else gen


def beam_search(engine, prompts: list[list[int]], params: BeamSearchParams) -> list[BeamSearchOutput]:
    """prompts: token-id lists. Runs on ``engine`` (an LLMEngine) with greedy one-token requests."""
    searches = [BeamSearchState(p, params, engine.eos_ids) for p in prompts]
    sp = step_params(params.beam_width)
    while True:
        active = [s for s in searches if s.running]
        if not active:
            break
        outs = _one_token(engine, [b.tokens for s in active for b in s.live], sp)
        k = 0
        for s in active:
            n = len(s.live)
            s.advance(outs[k:k + n])
            k += n
    results = []
    for s in searches:
        ranked = s.ranked()
        for b in ranked:
            b.text = (engine.tokenizer.decode(s.output_ids(b), skip_special_tokens=True)
                      if engine.tokenizer is not None else None)
        results.append(BeamSearchOutput(ranked))
    return results


def _one_token(engine, prompts: list[list[int]], params: SamplingParams) -> list[dict[int, float]]:
    """{token: logprob} of the top continuations of each prompt (one engine pass over all of them)."""
    ids = [engine.add_request(p, params) for p in prompts]
    got: dict[str, dict[int, float]] = {}
    try:
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    c = o.outputs[0]
                    if c.finish_reason not in ("length", "stop"):
                        raise RuntimeError(f"beam search: a step request ended with {c.finish_reason} "
                                           f"({c.stop_reason})")
                    got[o.request_id] = dict(c.logprobs[0])
    finally:
        for rid in ids:
            if rid not in got:
                engine.abort(rid)
    return [got[r] for r in ids]
