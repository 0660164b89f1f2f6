"""Continuous batching: who runs this step and with how many tokens.

Each step has a token budget (``max_num_batched_tokens``). Running sequences go first: the decoding ones,
each feeding its last token plus all its MTP drafts (the budget is at least max_num_seqs × (1 + k), so
drafts are never cut), then those still prefilling, each with the next chunk of its prompt (chunked
prefill), in admission order. Then waiting sequences are admitted, front first, while there are sequence
slots, budget and cache blocks (after reusing any cached prefix blocks); a prompt longer than the remaining
budget starts with a chunk. Requests therefore join and leave the batch at step boundaries.

When the cache runs out of blocks, the most recently admitted running sequence not yet scheduled this step
is preempted: its blocks are freed and it goes back to the front of the waiting queue, to be recomputed
later from its tokens (prompt + outputs so far), as vLLM's "recompute" preemption. Its pending MTP drafts
are kept: the recompute stops one token short and the next step verifies them, as it would have.

With ``policy="priority"`` (vLLM's ``scheduling_policy``), the waiting queue is ordered by (priority, arrival):
a lower value is served first, ties in arrival order. The preemption victim is then the running sequence
with the largest (priority, arrival), rather than the most recently admitted one, even one already scheduled
this step (it is taken out of the step again, as vLLM does): decoding sequences are scheduled first, so
otherwise a higher-priority sequence that needs a block would yield to a lower-priority one scheduled before it.

Drafts are never cut and survive preemption because that is the simplest schedule, not for correctness:
verification decides every token, greedy by the argmax and a seeded sampled request by position-keyed noise
(glm5/engine/sampler.py), so the tokens of both are the same whether drafts are verified, dropped or never
made (``spec_disable_batch_size`` pauses drafting for everyone). Unseeded sampled requests promise no
particular tokens.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from glm5.engine.block_manager import BlockManager
from glm5.engine.sequence import Sequence, SequenceStatus


@dataclass
class Scheduled:
    seq: Sequence
    num_new_tokens: int  # tokens taken from seq.token_ids[seq.num_computed_tokens:]
    draft_ids: list[int]  # MTP drafts to verify after them (decode only)
    hashed_before: int = 0  # len(seq.block_hashes) before this step registered blocks (``Scheduler._publish_ahead``)

    @property
    def completes(self) -> bool:
        """After this step every token is cached, so a next token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[Scheduled] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens + len(s.draft_ids) for s in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 num_spec_tokens: int = 0, on_admit=None, on_preempt=None, policy: str = "fcfs"):
        if policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {policy!r}")
        self.policy = policy
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max(max_num_batched_tokens, max_num_seqs * (1 + num_spec_tokens))
        self.k = num_spec_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.on_admit = on_admit  # callbacks (engine): set up per-sequence state
        self.on_preempt = on_preempt
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq, front=False)

    def _enqueue(self, seq: Sequence, front: bool) -> None:
        """fcfs: the back (new) or the front (preempted); priority: by (priority, arrival), wherever that is."""
        if self.policy == "priority":
            keys = [_rank(s) for s in self.waiting]
            self.waiting.insert(bisect.bisect_right(keys, _rank(seq)), seq)
        elif front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------------------------------------
    def _slots_needed(self, seq: Sequence, n: int, drafts: int) -> int:
        # new tokens + drafts, plus room for the MTP layers' tentative draft-chain entries
        return seq.num_computed_tokens + n + drafts + self.k

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.num_computed_tokens = 0  # drafts stay: verified after the recompute
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq, front=True)
        out.preempted.append(seq)
        if self.on_preempt:
            self.on_preempt(seq)

    def _victim(self, done: set[int], seq: Sequence) -> Sequence:
        """Whom to preempt so that ``seq`` fits (``seq`` itself if it is the one to yield). fcfs: the most recently
        admitted not already scheduled this step; priority: the largest (priority, arrival) of all."""
        if self.policy == "priority":
            return max(self.running, key=_rank)
        candidates = [v for v in self.running if v.seq_id not in done]
        return candidates[-1] if candidates else seq

    def _unschedule(self, seq: Sequence, out: SchedulerOutput, done: set[int]) -> int:
        """Take ``seq`` out of this step (it is about to be preempted): its registrations ahead go back. Returns the
        budget it had taken."""
        s = next(s for s in out.scheduled if s.seq is seq)
        out.scheduled.remove(s)
        done.discard(seq.seq_id)
        self.bm.unpublish(seq, s.hashed_before)
        return s.num_new_tokens + len(s.draft_ids)

    def _chunk(self, seq: Sequence, budget: int) -> tuple[int, list[int]]:
        """(new tokens, drafts) for ``seq`` this step. A sequence holding drafts verifies them right after its
        last token; one still (re)computing its tokens stops one short of that."""
        n = seq.num_tokens - seq.num_computed_tokens
        if seq.draft_token_ids:
            if n == 1:
                return 1, list(seq.draft_token_ids)
            n -= 1
        return min(n, budget), []

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        done: set[int] = set()
        order = [s for s in self.running if s.in_decode] + [s for s in self.running if not s.in_decode]
        for seq in order:
            if budget <= 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n, drafts = self._chunk(seq, budget)
            if n + len(drafts) > budget:  # cannot happen for decodes (budget floor); defer rather than cut
                continue
            ok = True
            while not self.bm.can_allocate(seq, self._slots_needed(seq, n, len(drafts))):
                victim = self._victim(done, seq)
                if victim.seq_id in done:
                    budget += self._unschedule(victim, out, done)
                self._preempt(victim, out)
                if victim is seq:
                    ok = False
                    break
            if not ok:
                continue
            self.bm.allocate(seq, self._slots_needed(seq, n, len(drafts)))
            out.scheduled.append(self._publish_ahead(Scheduled(seq, n, drafts)))
            done.add(seq.seq_id)
            budget -= n + len(drafts)
        if out.preempted:
            return out  # memory is tight: do not admit anything new this step
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if not seq.block_table:
                cached = 0 if seq.needs_prompt_logprobs else self.bm.match_prefix(seq)
                seq.num_computed_tokens = cached
                seq.num_cached_tokens = cached
            n, drafts = self._chunk(seq, budget)
            if n + len(drafts) > budget or not self.bm.allocate(seq, self._slots_needed(seq, n, len(drafts))):
                self.bm.free_seq(seq)  # give back any prefix blocks; retry on a later step
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if self.on_admit:
                self.on_admit(seq)
            out.scheduled.append(self._publish_ahead(Scheduled(seq, n, drafts)))
            budget -= n + len(drafts)
        return out

    def _publish_ahead(self, s: Scheduled) -> Scheduled:
        """Register now the blocks this step fills with final entries, so that a sequence admitted later in the
        same step (an identical prompt) shares them. With MTP, only a chunk of two or more tokens: its MTP entries
        are made in this step too (``MTPProposer.propose`` never holds such rows back), while a decoding
        sequence's may wait for a paused proposer and are registered when they are final."""
        s.hashed_before = len(s.seq.block_hashes)
        if self.k == 0 or s.num_new_tokens >= 2:
            self.bm.register_full_blocks(s.seq, s.seq.num_computed_tokens + s.num_new_tokens)
        return s

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted) sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
        seq.status = SequenceStatus.FINISHED


def _rank(seq: Sequence) -> tuple:
    return (seq.priority, seq.arrival, seq.seq_id)
