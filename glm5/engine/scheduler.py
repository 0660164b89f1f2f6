"""Continuous batching: who runs this step and with how many tokens.

Each step has a token budget (``max_num_batched_tokens``). Running sequences go first, in admission
order: a decoding sequence feeds its last token plus its MTP drafts, a sequence still prefilling feeds the
next chunk of its prompt (chunked prefill). Then waiting sequences are admitted, front first, while there
are sequence slots, budget and cache blocks (after reusing any cached prefix blocks); a prompt longer than
the remaining budget starts with a chunk. Requests therefore join and leave the batch at step boundaries.

When the cache runs out of blocks, the most recently admitted running sequence is preempted: its blocks
are freed and it goes back to the front of the waiting queue, to be recomputed later from its tokens
(prompt + outputs so far), as vLLM's "recompute" preemption.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from glm5.engine.block_manager import BlockManager
from glm5.engine.sequence import Sequence, SequenceStatus


@dataclass
class Scheduled:
    seq: Sequence
    num_new_tokens: int  # tokens taken from seq.token_ids[seq.num_computed_tokens:]
    draft_ids: list[int]  # MTP drafts to verify after them (decode only)

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
                 num_spec_tokens: int = 0, on_admit=None, on_preempt=None):
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
        seq.num_computed_tokens = 0
        seq.draft_token_ids = []
        seq.draft_probs = None
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        if self.on_preempt:
            self.on_preempt(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = seq.num_tokens - seq.num_computed_tokens
            drafts = list(seq.draft_token_ids) if seq.in_decode else []
            if n + len(drafts) > budget:
                drafts = drafts[: max(0, budget - n)]
                n = min(n, budget)
            ok = True
            while not self.bm.can_allocate(seq, self._slots_needed(seq, n, len(drafts))):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    ok = False
                    break
            if not ok:
                continue  # seq itself was preempted; running[i] is now the next one
            self.bm.allocate(seq, self._slots_needed(seq, n, len(drafts)))
            out.scheduled.append(Scheduled(seq, n, drafts))
            budget -= n + len(drafts)
            i += 1
        if out.preempted:
            return out  # memory is tight: do not admit anything new this step
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if not seq.block_table:
                cached = 0 if seq.needs_prompt_logprobs else self.bm.match_prefix(seq)
                seq.num_computed_tokens = cached
                seq.num_cached_tokens = cached
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.bm.allocate(seq, self._slots_needed(seq, n, 0)):
                self.bm.free_seq(seq)  # give back any prefix blocks; retry on a later step
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if self.on_admit:
                self.on_admit(seq)
            out.scheduled.append(Scheduled(seq, n, []))
            budget -= n
        return out

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted) sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
