"""The unit of RL data: one trajectory (prompt + response) with everything the loss and the bookkeeping need.

A :class:`Sample` is created by the data buffer (status PENDING, empty response), filled by the rollout
worker (response tokens, per-token rollout log-probs and loss mask, one weight version appended per engine
call), scored by the reward function, and consumed by the trainer. It is a plain dataclass of Python lists
so it pickles cheaply across process boundaries (multiprocessing queues, Ray object store).

Response layout (token-in / token-out; model output is never re-tokenised)::

    response_ids      = [model turn 1 ... <|observation|>][tool output + <|assistant|><think>][model turn 2 ...]
    loss_mask         = [1 ...                         1 ][0 ...                             0][1 ...]
    rollout_logprobs  = [engine log-probs of sampled tokens][0.0 ...                         ][...]

Statuses follow slime (``slime/utils/types.py``): PENDING (not finished: new, or interrupted and waiting to
resume), COMPLETED (EOS/stop), TRUNCATED (hit max_tokens or the turn limit), ABORTED (interrupted; partial
response kept for resumption), FAILED (environment/tool failure; excluded from training).
"""

from __future__ import annotations

import copy
import enum
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Status", "Sample", "group_by_id"]


class Status(str, enum.Enum):
    PENDING = "pending"
    COMPLETED = "completed"
    TRUNCATED = "truncated"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclass
class Sample:
    prompt_ids: list[int]
    task: dict = field(default_factory=dict)  # question, answer, answerable, task name, metadata (see tasks.py)
    group_id: int = 0  # samples of one prompt share it (GRPO group)
    index: int = 0  # position inside the group
    response_ids: list[int] = field(default_factory=list)
    rollout_logprobs: list[float] = field(default_factory=list)  # per response token (0.0 on tool tokens)
    loss_mask: list[int] = field(default_factory=list)  # per response token: 1 = model token trained on
    weight_versions: list[int] = field(default_factory=list)  # engine weight version of every engine call
    status: Status = Status.PENDING
    reward: float | None = None
    reward_info: dict = field(default_factory=dict)  # correct / abstained / answered / extracted answer
    response_text: str = ""
    num_turns: int = 0  # model turns generated so far (multi-turn tool use)
    tool_calls: int = 0
    max_new_tokens: int = 0  # budget of response tokens (model + tool) for the whole trajectory
    failure_reason: str | None = None
    advantage: float = 0.0  # filled in by the trainer (group-normalised reward)
    rollout_id: int = -1  # manager step that first submitted it
    resumed: int = 0  # how many times an interrupted generation was resumed
    extra: dict = field(default_factory=dict)  # e.g. multi-turn state while a tool call is pending
    # speculative decoding in the rollout engine (MTP drafts): verification steps and drafts accepted, summed over
    # the engine calls that generated this sample
    spec_verify_steps: int = 0
    spec_accepted_tokens: int = 0

    # ------------------------------------------------------------------------------------------- views
    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def response_length(self) -> int:
        return len(self.response_ids)

    @property
    def num_model_tokens(self) -> int:
        return int(sum(self.loss_mask))

    @property
    def remaining_tokens(self) -> int:
        return max(0, self.max_new_tokens - len(self.response_ids))

    @property
    def oldest_version(self) -> int | None:
        return min(self.weight_versions) if self.weight_versions else None

    @property
    def finished(self) -> bool:
        return self.status in (Status.COMPLETED, Status.TRUNCATED, Status.FAILED)

    def staleness(self, current_version: int) -> int:
        """Versions between the oldest weights that produced any token and ``current_version`` (GLM-5's
        w' − w₀)."""
        v = self.oldest_version
        return 0 if v is None else current_version - v

    # ------------------------------------------------------------------------------------------ edits
    def append(self, token_ids: list[int], logprobs: list[float] | None, trainable: bool) -> None:
        """Append a segment: model tokens (trainable, with their rollout log-probs) or environment tokens
        (tool output, chat scaffolding: masked out, log-prob 0)."""
        n = len(token_ids)
        if logprobs is None:
            logprobs = [0.0] * n
        if len(logprobs) != n:
            raise ValueError(f"{n} tokens but {len(logprobs)} log-probs")
        self.response_ids.extend(int(t) for t in token_ids)
        self.rollout_logprobs.extend(float(x) for x in logprobs)
        self.loss_mask.extend([1 if trainable else 0] * n)

    def check(self) -> None:
        n = len(self.response_ids)
        if not (len(self.rollout_logprobs) == len(self.loss_mask) == n):
            raise ValueError(f"sample {self.group_id}/{self.index}: response {n}, logprobs {len(self.rollout_logprobs)}, "
                             f"mask {len(self.loss_mask)}")

    def clone(self) -> "Sample":
        return copy.deepcopy(self)

    def reset(self) -> None:
        """Forget the response (regenerate from scratch)."""
        self.response_ids, self.rollout_logprobs, self.loss_mask = [], [], []
        self.weight_versions, self.status, self.reward, self.reward_info = [], Status.PENDING, None, {}
        self.response_text, self.num_turns, self.tool_calls, self.extra = "", 0, 0, {}
        self.spec_verify_steps = self.spec_accepted_tokens = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Sample":
        d = dict(d)
        d["status"] = Status(d.get("status", "pending"))
        return cls(**d)


def group_by_id(samples: list[Sample]) -> dict[int, list[Sample]]:
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group_id, []).append(s)
    for g in groups.values():
        g.sort(key=lambda s: s.index)
    return groups
