"""MTP speculative decoding: draft k tokens with GLM-5's one MTP layer, verify them in one target forward.

Drafting follows the MTP recursion the model defines (``GLM5ForCausalLM.mtp_forward``; GLM-5 trains 3
steps that share this one layer): at depth d, position s,
    h^d_s = MTPLayer(h^{d-1}_s, token x_{s+d}),   logits^d_s = lm_head(shared_head.norm(h^d_s)) predict x_{s+d+1},
with h^0 the main model's final (normed) hidden state and attention at depth d over the depth-d entries of
earlier positions. Each depth therefore keeps its own latent cache (cache layer ``num_hidden_layers + d -
1``) and is kept up to date ("committed") for every position whose inputs are final: h^{d-1}_s committed
and x_{s+d} accepted. To draft after the last token x_{L-1}, depth d runs over its uncommitted positions up
to L-2, where the needed tokens past x_{L-1} are the drafts of the lower depths; its output at L-2 gives
draft d. Those tentative cache entries are simply overwritten later.

That is ``draft_mode="recursive"``. The default, ``"chain"``, is how vLLM's MTP / EAGLE proposers reuse one draft
layer: depth 1 catches up as above and gives d_1 at position L-2; then each further draft is one row, the MTP layer
at the next position (L-1, L, ...) on the previous step's output h and the previous draft, attending over depth 1's
cache (one cache layer, not k). The inputs of draft j are the recursion's (h^{j-1}, d_{j-1}); only the attention
context (depth-1 entries) and the position differ. Measured on a self-distilled MTP layer (benchmarks/engine.md §2)
the acceptance is the same and a step is cheaper: k-1 one-row forwards instead of k catch-up passes.

Draft length (``stop_gap`` > 0): a greedy sequence stops drafting after a draft whose two best MTP logits are less
than ``stop_gap`` apart, the draft that decides a close call. Such a draft still goes to verification, but the
ones after it would follow an uncertain prefix and cost an MTP step and a verification row each. Greedy output
is unchanged whatever the policy (verification decides every token); sampled requests always draft k, since their
acceptance depends on how well the draft distribution matches the target's, not on how peaked it is.

Verification feeds [x_{L-1}, d_1..d_k] to the target. Greedy requests accept drafts while they equal the
target argmax (so output is exactly the non-speculative greedy output). Seeded sampled requests work the same
way on position-keyed noise (glm5/engine/sampler.py): draft i is the race winner argmax(q_i / E_j) of its output
position j's noise E_j over the draft distribution, the target's token there is argmax(p_i / E_j), and drafts
are accepted while the two agree. Every emitted token is then the one plain decoding would sample, so a seeded
request's tokens do not depend on speculation (on, off, paused, drafts dropped). Sharing E couples draft and
target: they agree with probability >= (1 - TV) / (1 + TV) (TV the total variation between p_i and q_i),
a little below rejection sampling's 1 - TV. Unseeded sampled requests use rejection sampling (accept d_i with
probability min(1, p_i(d_i)/q_i(d_i)), else resample from max(0, p_i - q_i)), which leaves the output
distribution equal to the target's with the most acceptance. The bonus token comes from the first rejected
or the (k+1)-th target row.
"""

from __future__ import annotations

import torch

from glm5.engine.model_runner import Chunk, ModelRunner
from glm5.engine.sampler import apply_logits_processors, processed_probs, race_tokens, unusable_reason, unusable_rows
from glm5.engine.sampling_params import SamplingParams
from glm5.engine.sequence import Sequence


def rejection_sample(target_probs: torch.Tensor, draft_ids: list[int], draft_probs: torch.Tensor | None,
                     generator: torch.Generator | None) -> tuple[list[int], int]:
    """Speculative sampling for one sequence.

    target_probs [k+1, V]: the target's sampling distributions at the k draft positions and the bonus one.
    draft_ids (k) with draft_probs [k, V] (the distributions they were drawn from; None = greedy, where
    target_probs rows are one-hot). Returns (emitted tokens: accepted drafts + one more, number accepted).
    """
    k = len(draft_ids)
    if draft_probs is None:  # greedy: exact match against the target argmax
        return match_drafts(target_probs.argmax(-1).tolist(), draft_ids)
    u = torch.rand(k, generator=generator, device=target_probs.device) if k else None
    out = []
    for i, d in enumerate(draft_ids):
        p, q = target_probs[i], draft_probs[i]
        if float(p[d]) > 0 and float(u[i]) * float(q[d]) <= float(p[d]):  # u < p/q, never dividing by a zero q
            # (p = 0: a token the target forbids, e.g. by a grammar, is never accepted, not even when u is 0)
            out.append(d)
            continue
        residual = (p - q).clamp_min(0)
        if float(residual.sum()) <= 0:
            residual = p
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out, i
    out.append(int(torch.multinomial(target_probs[k], 1, generator=generator)))
    return out, k


def match_drafts(target_ids: list[int], draft_ids: list[int]) -> tuple[list[int], int]:
    """Drafts accepted while they equal the target's token at their position (k + 1 target tokens, the last
    the bonus): (emitted tokens = accepted drafts + the target's next one, number accepted)."""
    for i, d in enumerate(draft_ids):
        if target_ids[i] != d:
            return list(draft_ids[:i]) + [target_ids[i]], i
    return list(draft_ids) + [target_ids[len(draft_ids)]], len(draft_ids)


def verify(seq: Sequence, logits: torch.Tensor, draft_ids: list[int]) -> tuple[list[int], int]:
    """One sequence's verification: its processed target logits [k+1, V] (row i predicts output position
    num_output_tokens + i) against its drafts -> (emitted tokens, drafts accepted). Greedy: the argmax; seeded:
    the race on each position's noise; unseeded: rejection sampling against the draft distributions."""
    p, rng = seq.params, seq.generator
    if p.greedy:  # argmax rows stand in for one-hot distributions
        return rejection_sample(logits, draft_ids, None, None)
    probs = target_probs(logits, p)
    if isinstance(rng, int):
        j = seq.num_output_tokens
        return match_drafts(race_tokens(probs, [rng] * probs.shape[0], list(range(j, j + probs.shape[0]))),
                            draft_ids)
    return rejection_sample(probs, draft_ids, seq.draft_probs, rng)


def process_verify_rows(seq: Sequence, drafts: list[int], rows: torch.Tensor):
    """The verification rows with the request's logits processors applied, row j seeing the output so far plus
    the first j drafts (as if they had been sampled), so a draft a grammar or a ban forbids gets target
    probability 0 and is rejected. Returns (rows, None), or (rows, why) when a row cannot be sampled."""
    if not seq.params.logits_processors:
        return rows, None
    out = seq.output_token_ids
    m = rows.shape[0]
    errors: list[str | None] = [None] * m
    done = apply_logits_processors(rows, [seq.params] * m, [out + drafts[:j] for j in range(m)], errors)
    # Only rows up to the first rejected draft are used; a row after a forbidden draft may be empty, which is
    # not the request's failure. The first row always counts.
    for j in range(m):
        if errors[j] is not None:
            return done, errors[j]
        if bool(unusable_rows(done[j:j + 1])):
            return done, unusable_reason(rows[j], done[j])
        if j < len(drafts) and not bool(torch.isfinite(done[j, drafts[j]])):
            break  # draft j is forbidden: later rows are never used
    return done, None


# Most main-model hidden rows a sequence may hold back while drafting is paused (``propose(defer=True)``); past
# this its MTP caches catch up anyway, so the held rows stay bounded (GLM-5, bf16: 512 × 6144 × 2 B = 6 MB).
MAX_DEFERRED_ROWS = 512


class SpecState:
    """Per-sequence MTP bookkeeping, for the D depths kept in the cache (D = k recursive, 1 chained).
    mtp_len[d] (d = 1..D): positions with committed depth-d cache entries;
    hbuf[d] (d = 0..D-1): committed h^d rows for positions [mtp_len[d+1], end_d) not yet consumed by depth
    d+1 (end_0 = the main cache length, end_d = mtp_len[d]). ``held``: where the h^0 rows that follow hbuf[0],
    held back while drafting is paused, lie in the proposer's ``HeldRows`` (indices into its buffer)."""

    def __init__(self, k: int, start: int = 0):
        self.mtp_len = [start] * (k + 1)
        self.hbuf: list[torch.Tensor | None] = [None] * (k + 1)
        self.held: list[int] = []


class HeldRows:
    """The h^0 rows sequences hold back while drafting is paused, appended step after step to one buffer ``buf``
    [cap, H] (rows [0, top) written); each sequence keeps the indices of its own rows (``SpecState.held``). A paused
    step costs one copy of its rows, contiguous (a slice of the step's hidden states when, as in decoding, every
    row is held), and a list append per sequence. (A tensor per sequence and step, as before, cost a copy kernel and
    a live Python object each: 2% of a 128-sequence CPU decode, and earlier full garbage collections, ~70 ms each;
    benchmarks/rl.md §5.)
    When the buffer is full, the rows of the sequences still holding are compacted to its front (those of sequences
    that finished, were preempted or caught up are dropped) and it is sized to twice what remains with the step's
    rows: it never exceeds twice the most rows live sequences held at once (each at most MAX_DEFERRED_ROWS), and a
    row is copied O(1) times on average."""

    def __init__(self):
        self.buf: torch.Tensor | None = None
        self.top = 0
        self.holders: dict[int, tuple[Sequence, SpecState]] = {}  # seq_id -> a sequence holding rows, and its state

    def put(self, hidden: torch.Tensor, holds: list[tuple[Sequence, int, int]]) -> None:
        """holds: (sequence, first row in ``hidden`` [N,H], rows): append those rows to each sequence's backlog."""
        total = sum(n for _, _, n in holds)
        if self.buf is None or self.top + total > self.buf.shape[0]:
            self._compact(hidden, total)
        top, first = self.top, holds[0][1]
        src, contiguous = [], True
        for seq, row, n in holds:
            st = seq.spec
            if not st.held:
                self.holders[seq.seq_id] = (seq, st)
            contiguous = contiguous and row == first + top - self.top
            if n == 1:  # a decode step's one row: no ranges to build
                st.held.append(top)
                src.append(row)
            else:
                st.held.extend(range(top, top + n))
                src.extend(range(row, row + n))
            top += n
        out = self.buf[self.top:top]
        if contiguous:
            out.copy_(hidden[first:first + total])
        else:
            out.copy_(hidden.index_select(0, torch.tensor(src, dtype=torch.long, device=hidden.device)))
        self.top = top

    def take(self, seq: Sequence) -> torch.Tensor | None:
        """The sequence's held rows [n,H] (a copy), no longer held."""
        st = seq.spec
        if not st.held:
            return None
        rows = self.buf.index_select(0, torch.tensor(st.held, dtype=torch.long, device=self.buf.device))
        st.held = []
        del self.holders[seq.seq_id]
        return rows

    def prune(self) -> None:
        """Forget the sequences that are gone, and free the buffer when no live one holds rows."""
        self.holders = {i: (seq, st) for i, (seq, st) in self.holders.items() if _holds(seq, st)}
        if not self.holders:
            self.buf, self.top = None, 0

    def _compact(self, hidden: torch.Tensor, extra: int) -> None:
        """The live sequences' rows to the front of a buffer with room for twice them and ``extra`` more rows."""
        self.prune()
        keep = [i for _, st in self.holders.values() for i in st.held]
        buf = hidden.new_empty(max(64, 2 * (len(keep) + extra)), hidden.shape[-1])
        if keep:
            buf[:len(keep)] = self.buf.index_select(0, torch.tensor(keep, dtype=torch.long, device=self.buf.device))
        top = 0
        for _, st in self.holders.values():  # (the order ``keep`` was gathered in)
            st.held = list(range(top, top + len(st.held)))
            top += len(st.held)
        self.buf, self.top = buf, top


def _holds(seq: Sequence, st: SpecState) -> bool:
    """``st`` is still ``seq``'s state and holds rows: not finished, preempted (spec None), readmitted (a new
    SpecState) or caught up."""
    return bool(st.held) and seq.spec is st and not seq.is_finished


DRAFT_MODES = ("chain", "recursive")


def mtp_cache_layers(num_spec_tokens: int, draft_mode: str) -> int:
    """Cache layers the MTP drafts need: one per depth for the recursion, one for the chain (none without drafts)."""
    if draft_mode not in DRAFT_MODES:
        raise ValueError(f"mtp_draft_mode must be one of {DRAFT_MODES}, got {draft_mode!r}")
    return num_spec_tokens if draft_mode == "recursive" else min(1, num_spec_tokens)


def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    """[n,V] -> [n]: the best logit minus the second best (inf where only one token is finite or V = 1)."""
    if logits.shape[-1] < 2:
        return logits.new_full(logits.shape[:1], float("inf"))
    top = logits.topk(2, dim=-1).values
    # -inf - -inf = nan: a row with nothing allowed, which drafting treats as unusable anyway
    return (top[:, 0] - top[:, 1]).nan_to_num(nan=float("inf"), posinf=float("inf"))


class MTPProposer:
    def __init__(self, runner: ModelRunner, num_spec_tokens: int, draft_mode: str = "chain", stop_gap: float = 0.0):
        if runner.model.model.mtp is None:
            raise ValueError("speculative decoding needs the model's MTP layer (num_nextn_predict_layers > 0)")
        self.runner = runner
        self.k = num_spec_tokens
        self.stop_gap = stop_gap  # greedy drafting stops after a draft with a top-2 logit gap below this (0 = never)
        self.depths = mtp_cache_layers(num_spec_tokens, draft_mode)  # depths kept in the cache (and caught up)
        self.held = HeldRows()  # h^0 rows held back while drafting is paused

    def reset(self, seq: Sequence, start: int = 0) -> None:
        seq.spec = SpecState(self.depths, start)

    def committed(self, seq: Sequence) -> int:
        """Positions whose main *and* every depth's cache entries are final (for prefix-cache publishing)."""
        st = getattr(seq, "spec", None)
        return min([seq.num_computed_tokens] + (st.mtp_len[1:] if st else [0]))

    @torch.inference_mode()
    def propose(self, hidden: torch.Tensor, items: list[tuple[Sequence, int, int]], max_drafts: list[int],
                defer: bool = False) -> list[Sequence]:
        """Bring the MTP caches up to date and draft for decoding sequences.

        hidden [N,H]: the step's final hidden states. items: (sequence, its first row in ``hidden``, first newly
        committed position p0); its rows hidden[row : row + num_computed_tokens - p0] are h^0 of positions p0...
        max_drafts[i]: drafts wanted for item i (0 = none: still prefilling, or about to finish).
        defer: drafting is paused (a large batch): items that want no drafts and bring one new row keep it
        (``HeldRows``), and their MTP caches catch up in one batched pass when drafting resumes (or at
        ``MAX_DEFERRED_ROWS``).
        Sets ``seq.draft_token_ids`` and ``seq.draft_probs``. Returns the sequences whose MTP caches ran (the others
        only held rows: their committed length did not move).
        """
        works, holds = [], []
        for (seq, row, p0), kmax in zip(items, max_drafts):
            st = seq.spec
            n = seq.num_computed_tokens - p0
            # a chunk of 2+ rows (a prompt, a recompute) is never held: the scheduler registered its blocks for the
            # prefix cache ahead of this step (``Scheduler._publish_ahead``), so their MTP entries are due now; nor
            # is a finishing sequence here (it is, only to make such blocks final)
            if defer and not kmax and n <= 1 and not seq.is_finished and len(st.held) + n <= MAX_DEFERRED_ROWS:
                if n:
                    holds.append((seq, row, n))
                continue
            prev = st.hbuf[0]
            # (checked where the rows are consumed: held steps are covered by the held rows' count)
            assert st.mtp_len[1] + (0 if prev is None else prev.shape[0]) + len(st.held) == p0, \
                "MTP catch-up out of sync"
            st.mtp_len[0] = seq.num_computed_tokens  # (read by depth 1 only, so set only when it runs)
            held = self.held.take(seq)
            rows = [t for t in (prev, held, hidden[row:row + n]) if t is not None]
            w = _Work(seq, st, torch.cat(rows) if len(rows) > 1 else rows[0], kmax)
            if kmax:  # a catch-up only (kmax 0) leaves pending drafts alone: a recompute verifies them next
                seq.draft_token_ids, seq.draft_probs = [], None
            works.append(w)
        if holds:
            self.held.put(hidden, holds)
        elif not defer:
            self.held.prune()
        for d in range(1, self.depths + 1):
            self._depth(works, d)
        if self.k > self.depths and not self._chain_in_one_step(works):
            for d in range(self.depths + 1, self.k + 1):
                self._chain(works, d)
        for w in works:
            if w.dists:
                w.seq.draft_probs = torch.stack(w.dists)
        return [w.seq for w in works]

    def _depth(self, works: list["_Work"], d: int) -> None:
        """Run depth d for every sequence: its committed catch-up plus, when drafting, the tentative tail."""
        chunks, rows, running = [], [], []
        for w in works:
            seq, st = w.seq, w.st
            L = seq.num_tokens
            w.start = st.mtp_len[d]  # ``w.avail`` (h^{d-1}) starts at this position
            # committed depth-d rows need h^{d-1} committed and their token x_{t+d} sampled (t + d ≤ L - 1); a
            # sequence shorter than the depth (a 1-token prompt, 3 drafts) commits none yet, never fewer than before
            w.commit_end = max(w.start, min(st.mtp_len[d - 1], L - d))
            w.run_end = L - 1 if d <= w.kmax else w.commit_end
            w.h = None
            if w.run_end > w.start:
                ext = seq.token_ids + seq.draft_token_ids
                chunks.append(Chunk(seq.block_table, w.start, ext[w.start + d:w.run_end + d]))
                rows.append(w.avail[: w.run_end - w.start])
                running.append(w)
        logits, last_row = None, {}
        if chunks:
            out, logits = self._mtp(chunks, torch.cat(rows), d)  # logits: from a static step, else None
            off = 0
            for w in running:
                n = w.run_end - w.start
                w.h = out[off:off + n]
                off += n
                last_row[id(w)] = off - 1
        drafting = []
        for w in works:
            st = w.st
            # committed h^{d-1} rows that depth d has not consumed yet
            lo, hi = w.commit_end - w.start, st.mtp_len[d - 1] - w.start
            st.hbuf[d - 1] = w.avail[lo:hi] if hi > lo else None
            prev = st.hbuf[d] if d < self.depths else None  # committed h^d for [mtp_len[d+1], old mtp_len[d])
            st.mtp_len[d] = w.commit_end
            if d < self.depths:
                parts = [t for t in (prev, w.h) if t is not None and t.shape[0]]
                w.avail = torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else w.avail[:0])
            if d <= w.kmax and w.h is not None:
                drafting.append(w)
        if drafting:  # a static step computed every row's draft logits already: take each last row's
            last = [last_row[id(w)] for w in drafting]
            self._draft(drafting, d, self.runner.mtp_logits(torch.stack([w.h[-1] for w in drafting])) if logits is None
                        else logits[torch.tensor(last, device=logits.device)])

    def _chain(self, works: list["_Work"], d: int) -> None:
        """Draft d ≥ 2 in chain mode: one row per sequence, the MTP layer at position L-3+d on (h of draft d-1,
        draft d-1), its tentative entry written to depth 1's cache (rewritten by the next catch-up)."""
        drafting = [w for w in works if d <= w.kmax and len(w.seq.draft_token_ids) == d - 1]
        if not drafting:
            return
        h, logits = self._mtp([_chain_chunk(w, d) for w in drafting], torch.cat([w.h[-1:] for w in drafting]), 1)
        for i, w in enumerate(drafting):
            w.h = h[i:i + 1]
        self._draft(drafting, d, self.runner.mtp_logits(h) if logits is None else logits)

    def _chain_in_one_step(self, works: list["_Work"]) -> bool:
        """Every chained draft of greedy sequences without logits processors in one static step (a compiled CPU
        step: one call instead of k - 1; ``StaticDecodeRunner.run_chain``). The drafts are ``_chain``'s, cut after
        a close call as ``_draft`` cuts them. False when it does not apply: ``_chain`` then drafts one by one."""
        d0 = self.depths + 1
        drafting = [w for w in works if d0 <= w.kmax and len(w.seq.draft_token_ids) == d0 - 1]
        if not drafting:
            return True
        graphs = self.runner.graphs
        if graphs is None or any(not w.seq.params.greedy or w.seq.params.logits_processors for w in drafting):
            return False
        out = graphs.run_chain([_chain_chunk(w, d0) for w in drafting], torch.cat([w.h[-1:] for w in drafting]),
                               [w.kmax - self.depths for w in drafting], self.k - self.depths)
        if out is None:
            return False
        for w, toks, gaps in zip(drafting, *out):
            for d, t, gap in zip(range(d0, w.kmax + 1), toks, gaps):
                w.seq.draft_token_ids.append(t)
                if gap < self.stop_gap:  # a close call ends the drafts after this one
                    w.kmax = d
                    break
        return True

    def _mtp(self, chunks, hidden: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The MTP layer at depth d over the chunks -> (h^d [N,H], its draft logits [N,V] or None). Depth 1 replays
        a CUDA graph when one fits: one-row drafts, and catch-ups of at most k + 1 rows per sequence."""
        graphs = self.runner.graphs
        if graphs is not None and d == 1:
            out = graphs.run_rows(chunks, 1 if all(c.n == 1 for c in chunks) else self.k + 1, hidden=hidden)
            if out is not None:
                return out
        ids, pos, batch = self.runner.build(chunks)
        return self.runner.mtp(hidden, ids, pos, batch, d), None

    def _draft(self, drafting: list["_Work"], d: int, logits: torch.Tensor) -> None:
        """Draft d of each sequence from its MTP logits [n,V]: greedy; seeded, the race on the noise of its output
        position (num_output_tokens + d - 1, the one verification checks it at); or sampled from the stream
        (keeping the distribution for the rejection test). The request's processors apply, and a row they leave
        unusable ends that sequence's drafts."""
        params = [w.seq.params for w in drafting]
        stop = [False] * len(drafting)
        if any(p.logits_processors for p in params):
            # The request's processors (a grammar, bans, penalties) shape the drafts as they will shape the target,
            # so drafts verification would reject for them are not proposed. A failing or empty row only ends that
            # sequence's drafting; verification reports the error, if it is one.
            errors: list[str | None] = [None] * len(drafting)
            logits = apply_logits_processors(logits, params, [w.seq.output_token_ids + w.seq.draft_token_ids
                                                              for w in drafting], errors)
            stop = [e is not None or u for e, u in zip(errors, unusable_rows(logits).tolist())]
        # a close call ends a greedy sequence's drafts after this one (see the module docstring)
        close = (top2_gap(logits) < self.stop_gap).tolist() if self.stop_gap > 0 else [False] * len(drafting)
        if all(p.greedy for p in params):
            for i, (w, t) in enumerate(zip(drafting, logits.argmax(-1).tolist())):
                if stop[i]:
                    w.kmax = d - 1
                else:
                    w.seq.draft_token_ids.append(t)
                    if close[i]:
                        w.kmax = d
            return
        probs = processed_probs(logits, params)
        unusable = (unusable_rows(probs) | (probs.sum(-1) <= 0)).tolist()
        raced = [i for i, w in enumerate(drafting) if isinstance(w.seq.generator, int) and not w.seq.params.greedy
                 and not stop[i] and not unusable[i]]
        won = dict(zip(raced, race_tokens(probs[raced], [drafting[i].seq.generator for i in raced],
                                          [drafting[i].seq.num_output_tokens + d - 1 for i in raced]))) if raced else {}
        for i, w in enumerate(drafting):
            if stop[i]:
                w.kmax = d - 1
            elif w.seq.params.greedy:
                w.seq.draft_token_ids.append(int(probs[i].argmax()))
                if close[i]:
                    w.kmax = d
            elif unusable[i]:  # a broken draft distribution only ends drafting; the target decides the token
                w.kmax = d - 1
            elif i in won:  # verification needs no draft distribution: it compares race winners
                w.seq.draft_token_ids.append(won[i])
            else:
                w.seq.draft_token_ids.append(int(torch.multinomial(probs[i], 1, generator=w.seq.generator)))
                w.dists.append(probs[i])


def _chain_chunk(w: "_Work", d: int) -> Chunk:
    """Chained draft d's input: draft d-1 at position L-3+d (L = tokens so far), a one-token chunk."""
    return Chunk(w.seq.block_table, w.seq.num_tokens - 3 + d, w.seq.draft_token_ids[-1:])


class _Work:
    def __init__(self, seq: Sequence, st: SpecState, avail: torch.Tensor, kmax: int):
        self.seq, self.st, self.avail, self.kmax = seq, st, avail, kmax
        self.dists: list[torch.Tensor] = []
        self.start = self.commit_end = self.run_end = 0
        self.h: torch.Tensor | None = None


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The target's sampling distributions for one sequence's verification rows."""
    return processed_probs(logits, [params] * logits.shape[0])
