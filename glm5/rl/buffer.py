"""The data buffer: prompts -> groups of samples, group bookkeeping, partial-rollout resume, filters.

Flow (slime's ``RolloutDataSourceWithBuffer`` plus GLM-5's staleness rule)::

    get_work(k)       -> samples to (re)submit: first interrupted samples waiting to resume (oldest first),
                         then fresh groups of ``group_size`` copies of the next prompt
    add_partial(s)    <- an interrupted sample: with ``partial_rollout`` it keeps its partial response and goes
                         back to the resume queue; otherwise it is reset and regenerated from scratch
    add_finished(s)   <- a finished sample (COMPLETED / TRUNCATED / FAILED); when its whole group is back the
                         group is finalised: environment failures handled by GLM-5's rule (more than half valid:
                         pad by repeating valid samples; else drop), then dynamic sampling (drop a group whose
                         rewards have zero variance: it has no GRPO signal)
    pop_batch(n, v)   -> n ready groups for the trainer at weight version v, after the staleness filter: a group
                         with any sample whose oldest weight version w0 has v − w0 > τ is dropped and counted

Every drop is counted in :attr:`DataBuffer.stats` (``dropped_zero_std_groups``, ``dropped_stale_groups``/
``_samples``, ``dropped_failed_groups``) and consumed samples feed the staleness histogram.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from glm5.rl.sample import Sample, Status

__all__ = ["DataBuffer", "zero_variance", "BufferStats"]


def zero_variance(group: list[Sample], tol: float = 1e-6) -> bool:
    rewards = [float(s.reward or 0.0) for s in group]
    return (max(rewards) - min(rewards)) <= tol


@dataclass
class BufferStats:
    prompts_used: int = 0
    epochs: int = 0
    groups_submitted: int = 0
    samples_finished: int = 0
    samples_resumed: int = 0
    samples_restarted: int = 0
    groups_ready: int = 0
    groups_consumed: int = 0
    dropped_zero_std_groups: int = 0
    dropped_stale_groups: int = 0
    dropped_stale_samples: int = 0
    dropped_failed_groups: int = 0
    dropped_at_resume_groups: int = 0  # open when the checkpoint was written (see load_state_dict)
    padded_groups: int = 0
    staleness_hist: collections.Counter = field(default_factory=collections.Counter)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "staleness_hist"}
        d["staleness_hist"] = {int(k): int(v) for k, v in sorted(self.staleness_hist.items())}
        return d


class DataBuffer:
    """Prompt source + group bookkeeping + resume queue + staleness / dynamic-sampling filters.

    ``make_prompt(task) -> list[int]`` renders a task into prompt token ids (chat template applied).
    ``tau``: staleness bound (None = unbounded). ``dynamic_sampling``: drop zero-variance groups.
    """

    def __init__(self, tasks: list[dict], make_prompt: Callable[[dict], list[int]], group_size: int,
                 max_new_tokens: int, *, seed: int = 0, shuffle: bool = True, tau: int | None = None,
                 dynamic_sampling: bool = False, partial_rollout: bool = True, failure_padding: bool = True):
        if not tasks:
            raise ValueError("no tasks")
        if group_size < 1:
            raise ValueError("group_size must be >= 1")
        self.tasks = list(tasks)
        self.make_prompt = make_prompt
        self.group_size = group_size
        self.max_new_tokens = max_new_tokens
        self.tau = tau
        self.dynamic_sampling = dynamic_sampling
        self.partial_rollout = partial_rollout
        self.failure_padding = failure_padding
        self.shuffle = shuffle
        self._rng = random.Random(seed)
        self._order: list[int] = []
        self._cursor = 0
        self._next_gid = 0
        self._prompt_cache: dict[int, list[int]] = {}
        self._resume: collections.deque[Sample] = collections.deque()
        self._pending: dict[int, dict[int, Sample]] = {}  # gid -> index -> finished sample
        self._outstanding: dict[int, int] = {}  # gid -> samples not yet finished
        self._ready: collections.deque[list[Sample]] = collections.deque()
        self.stats = BufferStats()
        self._reset_streak()

    # ---------------------------------------------------------------------------------- drop streak
    def _reset_streak(self) -> None:
        """Groups dropped since a group was last kept, by reason (the manager stops a run that can never fill a
        batch, see RolloutManager._check_stalled)."""
        self.dropped_in_a_row = 0
        self.drop_streak: dict[str, int] = {}
        self.last_failure: str | None = None
        self.zero_variance_rewards: set[float] = set()

    def _dropped(self, why: str, group: list[Sample]) -> None:
        self.dropped_in_a_row += 1
        self.drop_streak[why] = self.drop_streak.get(why, 0) + 1
        if why == "failed":
            reasons = [s.failure_reason for s in group if s.status == Status.FAILED and s.failure_reason]
            self.last_failure = reasons[-1] if reasons else self.last_failure
        elif why == "zero reward variance" and len(self.zero_variance_rewards) < 8:
            self.zero_variance_rewards.add(float(group[0].reward or 0.0))

    # ------------------------------------------------------------------------------------- prompts
    def _next_task(self) -> tuple[int, dict]:
        if self._cursor >= len(self._order):
            self._order = list(range(len(self.tasks)))
            if self.shuffle:
                self._rng.shuffle(self._order)
            self._cursor = 0
            self.stats.epochs += 1
        i = self._order[self._cursor]
        self._cursor += 1
        self.stats.prompts_used += 1
        return i, self.tasks[i]

    def new_group(self, rollout_id: int = -1) -> list[Sample]:
        i, task = self._next_task()
        if i not in self._prompt_cache:
            self._prompt_cache[i] = list(self.make_prompt(task))
        gid = self._next_gid
        self._next_gid += 1
        group = [Sample(prompt_ids=list(self._prompt_cache[i]), task=task, group_id=gid, index=j,
                        max_new_tokens=self.max_new_tokens, rollout_id=rollout_id) for j in range(self.group_size)]
        self._outstanding[gid] = self.group_size
        self._pending[gid] = {}
        self.stats.groups_submitted += 1
        return group

    def get_work(self, max_samples: int, rollout_id: int = -1, new_groups: int | None = None) -> list[Sample]:
        """Up to ``max_samples`` samples to submit: resumable ones first, then whole new groups (at most
        ``new_groups`` of them). A new group is only started when all of it fits."""
        out: list[Sample] = []
        while self._resume and len(out) < max_samples:
            out.append(self._resume.popleft())
        started = 0
        while len(out) + self.group_size <= max_samples and (new_groups is None or started < new_groups):
            out.extend(self.new_group(rollout_id))
            started += 1
        return out

    @property
    def num_resumable(self) -> int:
        return len(self._resume)

    @property
    def num_outstanding(self) -> int:
        """Samples submitted (or waiting to resume) whose group is not finished."""
        return sum(self._outstanding.values())

    @property
    def num_ready(self) -> int:
        return len(self._ready)

    # ------------------------------------------------------------------------------------- returns
    def add_partial(self, sample: Sample) -> None:
        """An interrupted generation comes back: resume later (partial rollout) or restart from scratch."""
        if sample.group_id not in self._outstanding:
            raise KeyError(f"sample of unknown group {sample.group_id}")
        if self.partial_rollout and sample.response_ids:
            sample.status = Status.PENDING
            sample.resumed += 1
            self.stats.samples_resumed += 1
        else:
            sample.reset()
            self.stats.samples_restarted += 1
        self._resume.append(sample)

    def add_finished(self, sample: Sample) -> list[Sample] | None:
        """Record a finished sample; returns its group when that group is complete and was kept."""
        gid = sample.group_id
        if gid not in self._outstanding:
            raise KeyError(f"sample of unknown group {gid}")
        if not sample.finished:
            raise ValueError(f"add_finished: sample status is {sample.status}")
        self._pending[gid][sample.index] = sample
        self._outstanding[gid] -= 1
        self.stats.samples_finished += 1
        if self._outstanding[gid] > 0:
            return None
        group = [self._pending[gid][j] for j in sorted(self._pending[gid])]
        del self._pending[gid], self._outstanding[gid]
        group = self._finalize(group)
        if group is not None:
            self._ready.append(group)
            self.stats.groups_ready += 1
        return group

    def _finalize(self, group: list[Sample]) -> list[Sample] | None:
        valid = [s for s in group if s.status != Status.FAILED]
        if len(valid) < len(group):
            if self.failure_padding and 2 * len(valid) > len(group):
                pads = [valid[k % len(valid)].clone() for k in range(len(group) - len(valid))]
                for p, s in zip(pads, [s for s in group if s.status == Status.FAILED]):
                    p.index = s.index
                group = sorted(valid + pads, key=lambda s: s.index)
                self.stats.padded_groups += 1
            else:
                self.stats.dropped_failed_groups += 1
                self._dropped("failed", group)
                return None
        if self.dynamic_sampling and len(group) > 1 and zero_variance(group):
            self.stats.dropped_zero_std_groups += 1
            self._dropped("zero reward variance", group)
            return None
        self._reset_streak()
        return group

    # ------------------------------------------------------------------------------------- batches
    def drop_stale(self, current_version: int) -> int:
        """Apply the staleness bound to ready groups; returns how many groups were dropped."""
        if self.tau is None:
            return 0
        kept: collections.deque[list[Sample]] = collections.deque()
        dropped = 0
        for g in self._ready:
            if any(s.staleness(current_version) > self.tau for s in g):
                dropped += 1
                self.stats.dropped_stale_groups += 1
                self.stats.dropped_stale_samples += sum(1 for s in g if s.staleness(current_version) > self.tau)
                self._dropped("stale", g)
            else:
                kept.append(g)
        self._ready = kept
        return dropped

    def pop_batch(self, num_groups: int, current_version: int) -> list[list[Sample]] | None:
        """``num_groups`` ready groups (oldest first) after the staleness filter, or None if not enough."""
        self.drop_stale(current_version)
        if len(self._ready) < num_groups:
            return None
        batch = [self._ready.popleft() for _ in range(num_groups)]
        self.stats.groups_consumed += num_groups
        for g in batch:
            for s in g:
                self.stats.staleness_hist[s.staleness(current_version)] += 1
        return batch

    def state_dict(self) -> dict:
        return {"order": self._order, "cursor": self._cursor, "next_gid": self._next_gid,
                "rng": self._rng.getstate(), "stats": self.stats.to_dict(),
                "open_groups": len(self._outstanding) + len(self._ready)}  # submitted, neither trained nor dropped

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` (also after a JSON round trip). Open groups are not part of it: a
        resumed buffer starts empty, at the saved prompt position and group counter (rollout seeds follow it), and
        the groups open at the save count as ``dropped_at_resume_groups``."""
        if any(not 0 <= i < len(self.tasks) for i in state["order"]):
            raise ValueError("buffer state refers to tasks this buffer does not have")
        self._order, self._cursor, self._next_gid = list(state["order"]), int(state["cursor"]), int(state["next_gid"])
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        stats = dict(state["stats"])
        hist = collections.Counter({int(k): int(v) for k, v in stats.pop("staleness_hist", {}).items()})
        self.stats = BufferStats(**stats, staleness_hist=hist)
        # the groups that were open are gone: counted as dropped, so that submitted - dropped stays the number of
        # groups trained or open (the asynchronous admission budget depends on it)
        self.stats.dropped_at_resume_groups += int(state.get("open_groups", 0))
        self._resume.clear()
        self._pending.clear()
        self._outstanding.clear()
        self._ready.clear()
        self._reset_streak()
