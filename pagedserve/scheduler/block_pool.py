"""Physical KV blocks with reference counts, two free lists and the prefix-cache index.

Allocation order is exact and part of the contract (tests rely on it):
1. Plain free blocks (holding no cached prefix) first, in the order they were freed; a new pool
   starts with blocks 0, 1, 2, ... in ascending order.
2. Then free blocks that still hold a cached prefix, least recently freed first (LRU); taking
   one evicts it from the index. Callers free a request's blocks last block first, so the
   tail of a prefix is evicted before its head.
Several blocks may hold the same prefix (requests that computed it at the same time, a swapped
sequence brought back): the index keeps every copy, so evicting one leaves the others findable.
Every operation is O(1) per block, except lookup (O(copies of that prefix)) and reset.
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
        self._hash_to_blocks: dict[bytes, dict[int, None]] = {}
        """Chained hash -> the blocks holding that prefix, in the order they were cached."""

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
        allocate_one = self.allocate_one
        return [allocate_one() for _ in range(count)]

    def allocate_one(self) -> int | None:
        """Take the next free block in the documented order (ref count 1), or None when no
        block is free."""
        if self._free_plain:
            block_id = self._free_plain.popleft()
        elif self._free_cached:
            block_id, _ = self._free_cached.popitem(last=False)
            self._drop_from_index(block_id)
        else:
            return None
        self.ref_counts[block_id] = 1
        return block_id

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
        """A block holding the prefix with this chained hash, if any: one in use if there is
        one (sharing it takes no free block), else the first cached."""
        copies = self._hash_to_blocks.get(block_hash)
        if copies is None:
            return None
        for block_id in copies:
            if self.ref_counts[block_id]:
                return block_id
        return next(iter(copies))

    def cache(self, block_id: int, block_hash: bytes) -> None:
        """Index a full, computed block under its chained hash (a block keeps its first hash)."""
        if not self.enable_caching or self.block_hash[block_id] is not None:
            return
        self.block_hash[block_id] = block_hash
        self._hash_to_blocks.setdefault(block_hash, {})[block_id] = None

    def uncache(self, block_id: int) -> None:
        """Forget a block's hash (its content is about to change)."""
        if self.block_hash[block_id] is None:
            return
        self._drop_from_index(block_id)
        if block_id in self._free_cached:
            del self._free_cached[block_id]
            self._free_plain.append(block_id)

    def _drop_from_index(self, block_id: int) -> None:
        block_hash = self.block_hash[block_id]
        copies = self._hash_to_blocks[block_hash]
        del copies[block_id]
        if not copies:
            del self._hash_to_blocks[block_hash]
        self.block_hash[block_id] = None

    def reset_prefix_cache(self) -> bool:
        """Forget every hash; free cached blocks become plain (in LRU order). Refused (False,
        nothing changed) while a cached block is in use: its holder still reads and shares it,
        so the cache could not start empty."""
        if any(self.ref_counts[block_id] for copies in self._hash_to_blocks.values()
               for block_id in copies):
            return False
        for block_id in list(self._free_cached):
            self.uncache(block_id)
        return True

    def free_block_ids(self) -> list[int]:
        """Free blocks in allocation order (for tests and invariant checks)."""
        return list(self._free_plain) + list(self._free_cached)

    def check_invariants(self) -> None:
        """The index holds exactly the hashed blocks; each free list holds only its kind."""
        indexed = {(block_hash, block_id) for block_hash, copies in self._hash_to_blocks.items()
                   for block_id in copies}
        hashed = {(block_hash, block_id) for block_id, block_hash in enumerate(self.block_hash)
                  if block_hash is not None}
        if indexed != hashed:
            raise AssertionError("prefix-cache index differs from the blocks' hashes")
        if not all(self._hash_to_blocks.values()):
            raise AssertionError("prefix-cache index holds a hash with no block")
        if any(self.block_hash[b] is not None or self.ref_counts[b] for b in self._free_plain):
            raise AssertionError("plain free list holds a hashed or referenced block")
        if any(self.block_hash[b] is None or self.ref_counts[b] for b in self._free_cached):
            raise AssertionError("cached free list holds an unhashed or referenced block")
