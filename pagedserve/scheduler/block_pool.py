"""Physical KV blocks with reference counts, two free lists and the prefix-cache index.

Allocation order is exact and part of the contract (tests rely on it):
1. Plain free blocks (holding no cached prefix) first, in the order they were freed; a new pool
   starts with blocks 0, 1, 2, ... in ascending order.
2. Then free blocks that still hold a cached prefix, least recently freed first (LRU); taking
   one evicts its hash from the index. Callers free a request's blocks last block first, so the
   tail of a prefix is evicted before its head.
Every operation is O(1) per block.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable


class NoFreeBlocksError(RuntimeError):
    """The pool has fewer free blocks than were asked for."""


class BlockPool:
    """Fixed set of blocks, ids 0..num_blocks-1, each with a ref count and an optional hash."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"BlockPool.num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self._free_plain: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._free_cached)

    def usage(self) -> float:
        """Fraction of blocks referenced by some request."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, count: int) -> list[int]:
        """Take `count` free blocks (ref count 1 each) in the documented order."""
        if count > self.num_free_blocks:
            raise NoFreeBlocksError(f"asked for {count} blocks, {self.num_free_blocks} free")
        taken = []
        for _ in range(count):
            if self._free_plain:
                block_id = self._free_plain.popleft()
            else:
                block_id, _ = self._free_cached.popitem(last=False)
                del self._hash_to_block[self.block_hash[block_id]]
                self.block_hash[block_id] = None
            self.ref_counts[block_id] = 1
            taken.append(block_id)
        return taken

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; blocks reaching zero join a free list in order."""
        for block_id in block_ids:
            count = self.ref_counts[block_id] - 1
            if count < 0:
                raise RuntimeError(f"block {block_id} freed more often than referenced")
            self.ref_counts[block_id] = count
            if count == 0:
                if self.block_hash[block_id] is None:
                    self._free_plain.append(block_id)
                else:
                    self._free_cached[block_id] = None

    def share(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each block; a free cached block is taken off its free list."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                if self.block_hash[block_id] is None:
                    raise RuntimeError(f"block {block_id} is free and holds nothing to share")
                del self._free_cached[block_id]
            self.ref_counts[block_id] += 1

    def lookup(self, block_hash: bytes) -> int | None:
        """Block holding the prefix with this chained hash, if any."""
        return self._hash_to_block.get(block_hash)

    def cache(self, block_id: int, block_hash: bytes) -> None:
        """Index a full, computed block under its chained hash (first block wins on duplicates)."""
        if not self.enable_caching or self.block_hash[block_id] is not None:
            return
        if block_hash in self._hash_to_block:
            return
        self.block_hash[block_id] = block_hash
        self._hash_to_block[block_hash] = block_id

    def uncache(self, block_id: int) -> None:
        """Forget a block's hash (its content is about to change)."""
        block_hash = self.block_hash[block_id]
        if block_hash is None:
            return
        del self._hash_to_block[block_hash]
        self.block_hash[block_id] = None
        if block_id in self._free_cached:
            del self._free_cached[block_id]
            self._free_plain.append(block_id)

    def reset_prefix_cache(self) -> None:
        """Forget every hash; free cached blocks become plain (in LRU order)."""
        # Free cached blocks first, in their LRU order (the index's order is caching order).
        for block_id in [*self._free_cached, *self._hash_to_block.values()]:
            self.uncache(block_id)

    def free_block_ids(self) -> list[int]:
        """Free blocks in allocation order (for tests and invariant checks)."""
        return list(self._free_plain) + list(self._free_cached)
