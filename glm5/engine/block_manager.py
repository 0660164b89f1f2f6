"""Paged cache blocks: a fixed pool, a free list, reference counts and prefix reuse.

The cache budget is a fixed number of blocks of ``block_size`` token slots. A sequence owns an ordered
block table; slot ``block * block_size + i`` holds token position ``j * block_size + i`` of the j-th
table entry. Block 0 is reserved as the null block: padded batch entries read and write it, so no real
block is ever touched by padding.

Prefix caching: a block that will be full of computed tokens after a step is registered under a hash chained
over the block contents (``hash(parent_hash, tokens)``) when that step is scheduled, as vLLM does. A sequence
whose prompt starts with the same blocks reuses them (ref count + 1) instead of recomputing, even one admitted
in the same step: a layer writes every new token's cache entries before any sequence attends, so an identical
prompt's siblings (``n > 1``, an RL group) compute it once. A step that does not finish its work takes its
registrations back (``unpublish``). With MTP speculative decoding, depth d's cache entry
at position s also depends on token s + d, so the k tokens after a block join its hash. Freed
blocks keep their hash and stay reusable until the allocator hands them out again (LRU order).
"""

from __future__ import annotations

from collections import OrderedDict

from glm5.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_extra_tokens: int = 0):
        if num_blocks < 2:
            raise ValueError(f"need at least 2 cache blocks (one is the reserved null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.extra = hash_extra_tokens
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Free blocks in LRU order (oldest freed first); block 0 is never free.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.prefix_hits = 0  # tokens served from the prefix cache (lifetime)

    # ---------------------------------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks in use."""
        return 1.0 - len(self.free) / (self.num_blocks - 1)

    def blocks_needed(self, seq: Sequence, num_slots: int) -> int:
        """Blocks to add so that ``seq`` has cache slots for positions [0, num_slots)."""
        return max(0, -(-num_slots // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_slots: int) -> bool:
        return self.blocks_needed(seq, num_slots) <= len(self.free)

    # --------------------------------------------------------------------------------- prefix cache
    def reset_prefix_cache(self) -> None:
        """Forget every prefix-cache entry: after new weights the cached entries no longer match what the model
        would compute. Blocks keep their data and owners; they just cannot be matched any more."""
        self.hash_to_block.clear()
        self.block_hash = [None] * self.num_blocks

    # ------------------------------------------------------------------------------------- allocation
    def _pop_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict its prefix-cache entry: the contents are about to change
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
        self.ref_count[block] = 1
        return block

    def allocate(self, seq: Sequence, num_slots: int) -> bool:
        """Grow ``seq``'s block table to cover positions [0, num_slots). False (nothing changed) if the pool
        is too small."""
        need = self.blocks_needed(seq, num_slots)
        if need > len(self.free):
            return False
        for _ in range(need):
            seq.block_table.append(self._pop_free())
        return True

    def _hash(self, parent: int | None, tokens: tuple) -> int:
        return hash((parent, tokens))

    def _block_key(self, seq: Sequence, j: int) -> tuple:
        bs = self.block_size
        return tuple(seq.token_ids[j * bs:(j + 1) * bs + self.extra])

    def match_prefix(self, seq: Sequence) -> int:
        """For a sequence with no blocks yet: take over cached blocks matching its leading tokens. Returns the
        number of tokens now cached. At least one token is always left to compute (its logits are needed)."""
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1 - self.extra) // bs
        parent = None
        for j in range(max_blocks):
            h = self._hash(parent, self._block_key(seq, j))
            block = self.hash_to_block.get(h)
            if block is None:
                break
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        cached = len(seq.block_table) * bs
        self.prefix_hits += cached
        return cached

    def register_full_blocks(self, seq: Sequence, num_committed: int) -> None:
        """Publish the blocks now full of final cache entries (positions < num_committed) for prefix reuse."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(num_committed, seq.num_tokens - self.extra) // bs
        while len(seq.block_hashes) < full:
            j = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = self._hash(parent, self._block_key(seq, j))
            block = seq.block_table[j]
            if h not in self.hash_to_block and self.block_hash[block] is None:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
            seq.block_hashes.append(h)

    def unpublish(self, seq: Sequence, keep: int) -> None:
        """Take back the prefix-cache entries of ``seq``'s blocks from the (keep+1)-th on: registered ahead of a step
        whose entries turned out not to be final (its sequence failed, or the step raised)."""
        for j in range(keep, len(seq.block_hashes)):
            h, block = seq.block_hashes[j], seq.block_table[j]
            if self.hash_to_block.get(h) == block:  # (another sequence's block may hold this content's entry)
                del self.hash_to_block[h]
                self.block_hash[block] = None
        del seq.block_hashes[keep:]

    def free_seq(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # tail first: the prefix stays cached longest
            self._release(block)
        seq.block_table = []
        seq.block_hashes = []

    def _release(self, block: int) -> None:
        self.ref_count[block] -= 1
        assert self.ref_count[block] >= 0, f"block {block} freed twice"
        if self.ref_count[block] == 0:
            self.free[block] = None
