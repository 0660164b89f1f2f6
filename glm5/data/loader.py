"""Batches of fixed-length rows, in a deterministic, resumable order.

Two row makers share one loader:

* ``PackedRows``: pretraining. The token file is cut into windows of ``seq_len + 1`` tokens (stride
  ``seq_len``); row i predicts window[1:] from window[:-1]. Optional document masking (``doc_mask``) keeps
  attention inside each EOS-separated document and restarts position ids after each EOS.
* ``ConversationRows``: SFT. Whole conversations are packed greedily into rows of ``seq_len`` tokens (never
  split; longer ones are truncated), padded, with per-conversation attention masks and position ids;
  labels keep only tokens whose loss mask is set (the assistant's).

Order: epoch e visits rows in a permutation drawn from ``(seed, e)``; a global batch is ``batch_size ×
world_size`` consecutive rows of it and rank r takes its r-th slice, so one process with batch 2B sees
exactly the rows two processes with batch B see together. ``state_dict()`` is ``{epoch, step}``; loading
it resumes at the next batch, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Batch", "PackedRows", "ConversationRows", "BatchLoader", "IGNORE_INDEX"]

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B,S] int64
    labels: torch.Tensor  # [B,S] int64; labels[t] is the target for input position t, -100 = none
    position_ids: torch.Tensor  # [B,S] int64
    attention_mask: torch.Tensor | None  # [B,1,S,S] bool (document masking) or None (plain causal)

    def to(self, device) -> "Batch":
        m = self.attention_mask.to(device) if self.attention_mask is not None else None
        return Batch(self.input_ids.to(device), self.labels.to(device), self.position_ids.to(device), m)

    @property
    def n_tokens(self) -> int:
        """Number of positions that carry a loss."""
        return int((self.labels != IGNORE_INDEX).sum())


def _perm(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


class PackedRows:
    """Windows of a flat token array (pretraining)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, *, eos_id: int | None = None, doc_mask: bool = False):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{len(tokens)} tokens cannot fill one row of seq_len={seq_len} (+1)")
        if doc_mask and eos_id is None:
            raise ValueError("document masking needs the EOS id")
        self.tokens, self.seq_len, self.eos_id, self.doc_mask = tokens, seq_len, eos_id, doc_mask

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def epoch_rows(self, epoch: int, seed: int, shuffle: bool) -> list:
        return list(_perm(len(self), seed, epoch, shuffle))

    def build(self, spec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        S = self.seq_len
        w = np.asarray(self.tokens[spec * S: spec * S + S + 1], dtype=np.int64)
        ids, labels = w[:-1], w[1:].copy()
        if not self.doc_mask:
            return ids, labels, np.arange(S), None
        # A document ends with its EOS; the next token starts a new document at position 0.
        ends = (ids == self.eos_id).astype(np.int64)
        doc = np.concatenate([[0], np.cumsum(ends)[:-1]])
        starts = np.flatnonzero(np.concatenate([[1], np.diff(doc)]))
        pos = np.arange(S) - starts[doc]
        return ids, labels, pos, doc


class ConversationRows:
    """Whole conversations packed into rows (SFT). ``tokens``/``loss_mask`` are flat arrays and
    ``offsets`` [n+1] the conversation boundaries in them."""

    def __init__(self, tokens: np.ndarray, loss_mask: np.ndarray, offsets: np.ndarray, seq_len: int, pad_id: int):
        if len(tokens) != len(loss_mask):
            raise ValueError("tokens and loss_mask differ in length")
        self.tokens, self.loss_mask, self.offsets = tokens, loss_mask, np.asarray(offsets, dtype=np.int64)
        self.seq_len, self.pad_id = seq_len, pad_id
        self.lengths = np.minimum(np.diff(self.offsets), seq_len)
        self._rows_cache: dict = {}

    def __len__(self) -> int:  # rows of an unshuffled epoch
        return len(self.epoch_rows(0, 0, False))

    def epoch_rows(self, epoch: int, seed: int, shuffle: bool) -> list:
        key = (epoch, seed, shuffle)
        if key not in self._rows_cache:
            rows, cur, used = [], [], 0
            for c in _perm(len(self.lengths), seed, epoch, shuffle):
                L = int(self.lengths[c])
                if L < 2:
                    continue
                if used + L > self.seq_len and cur:
                    rows.append(cur)
                    cur, used = [], 0
                cur.append(int(c))
                used += L
            if cur:
                rows.append(cur)
            if len(self._rows_cache) >= 4:  # the current training epoch and the eval order, mostly
                self._rows_cache.pop(next(iter(self._rows_cache)))
            self._rows_cache[key] = rows
        return self._rows_cache[key]

    def build(self, spec):
        S = self.seq_len
        ids = np.full(S, self.pad_id, dtype=np.int64)
        labels = np.full(S, IGNORE_INDEX, dtype=np.int64)
        pos = np.arange(S, dtype=np.int64)
        doc = np.full(S, -1, dtype=np.int64)
        at = 0
        for j, c in enumerate(spec):
            a = int(self.offsets[c])
            L = int(self.lengths[c])
            t = np.asarray(self.tokens[a:a + L], dtype=np.int64)
            m = np.asarray(self.loss_mask[a:a + L], dtype=bool)
            ids[at:at + L] = t
            lab = np.where(m[1:], t[1:], IGNORE_INDEX)
            labels[at:at + L - 1] = lab
            pos[at:at + L] = np.arange(L)
            doc[at:at + L] = j
            at += L
        # Padding: its own "document" so it never attends to (or is attended by) real tokens.
        pos[at:] = np.arange(S - at)
        doc[at:] = len(spec)
        return ids, labels, pos, doc


class BatchLoader:
    """Deterministic batches over a row maker; ``state_dict`` / ``load_state_dict`` for exact resume."""

    def __init__(self, rows, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.step = 0, 0
        if self.steps_per_epoch(0) == 0:
            raise ValueError(f"{len(rows.epoch_rows(0, seed, shuffle))} rows cannot fill one global batch of "
                             f"{batch_size} × {world_size}")

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        n = len(self.rows.epoch_rows(self.epoch if epoch is None else epoch, self.seed, self.shuffle))
        return n // (self.batch_size * self.world_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("batch_size"), state.get("world_size")) != (self.batch_size, self.world_size):
            # A different sharding of the global batch: keep the global position (in rows).
            rows_done = state["step"] * state["batch_size"] * state["world_size"]
            self.epoch, self.step = state["epoch"], rows_done // (self.batch_size * self.world_size)
        else:
            self.epoch, self.step = state["epoch"], state["step"]

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self.step >= self.steps_per_epoch():
            self.epoch, self.step = self.epoch + 1, 0
        order = self.rows.epoch_rows(self.epoch, self.seed, self.shuffle)
        B = self.batch_size
        start = (self.step * self.world_size + self.rank) * B
        batch = self.collate([order[i] for i in range(start, start + B)])
        self.step += 1
        return batch

    def collate(self, specs) -> Batch:
        built = [self.rows.build(s) for s in specs]
        ids = torch.from_numpy(np.stack([b[0] for b in built]))
        labels = torch.from_numpy(np.stack([b[1] for b in built]))
        pos = torch.from_numpy(np.stack([b[2] for b in built]).astype(np.int64))
        mask = None
        if built[0][3] is not None:
            doc = torch.from_numpy(np.stack([b[3] for b in built]))
            S = doc.shape[1]
            causal = torch.ones(S, S, dtype=torch.bool).tril()
            mask = (doc[:, :, None] == doc[:, None, :]) & causal
            mask = mask[:, None]
        return Batch(ids, labels, pos, mask)

    def eval_batches(self, max_batches: int | None = None):
        """This rank's share of the first ``max_batches`` global batches, unshuffled (validation)."""
        order = self.rows.epoch_rows(0, self.seed, False)
        gb = self.batch_size * self.world_size
        n = len(order) // gb
        if max_batches is not None:
            n = min(n, max_batches)
        for i in range(n):
            start = (i * self.world_size + self.rank) * self.batch_size
            yield self.collate([order[j] for j in range(start, start + self.batch_size)])
