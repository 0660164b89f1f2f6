"""Beam search over the engine, in vLLM's shape (``LLM.beam_search(prompts, BeamSearchParams(...))``).

As vLLM does, beam search is not a sampling mode inside the engine: each step submits every live beam as a prompt
for one token with its ``2 × beam_width`` most likely continuations, and keeps the best ``beam_width`` extensions by
cumulative log-probability. The prefix cache serves the part of each beam the previous step already computed, so a
step recomputes only the tail of the last, partly filled cache block. A beam that emits EOS is finished; at the end
the finished beams and the live ones are ranked by cumulative log-probability divided by length^length_penalty.
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


def beam_search(engine, prompts: list[list[int]], params: BeamSearchParams) -> list[BeamSearchOutput]:
    """prompts: token-id lists. Runs on ``engine`` (an LLMEngine) with greedy one-token requests."""
    bw = params.beam_width
    step_params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=2 * bw)
    live = [[BeamSearchSequence(list(p))] for p in prompts]
    done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    for _ in range(params.max_tokens):
        beams = [(i, b) for i, group in enumerate(live) for b in group]
        if not beams:
            break
        outs = _one_token(engine, [b.tokens for _, b in beams], step_params)
        candidates: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        for (i, beam), out in zip(beams, outs):
            for tok, lp in out.items():
                candidates[i].append(BeamSearchSequence(beam.tokens + [tok], beam.logprobs + [lp],
                                                        beam.cum_logprob + lp))
        for i, cands in enumerate(candidates):
            cands.sort(key=lambda b: -b.cum_logprob)
            live[i] = []
            for b in cands:  # the best extensions; one that ends with EOS is a finished beam
                if len(live[i]) == bw:
                    break
                if not params.ignore_eos and b.tokens[-1] in engine.eos_ids:
                    b.finished = True
                    done[i].append(b)
                else:
                    live[i].append(b)
    results = []
    for p, finished, running in zip(prompts, done, live):
        ranked = sorted(finished + running, key=lambda b: -_score(b, len(p), params.length_penalty))[:bw]
        for b in ranked:
            gen = b.tokens[len(p):]
            if b.finished:
                gen = gen[:-1]  # the EOS token is not part of the text
            b.text = engine.tokenizer.decode(gen, skip_special_tokens=True) if engine.tokenizer is not None else None
        results.append(BeamSearchOutput(ranked))
    return results


def _score(beam: BeamSearchSequence, prompt_len: int, length_penalty: float) -> float:
    return beam.cum_logprob / max(1, len(beam.tokens) - prompt_len) ** length_penalty


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
