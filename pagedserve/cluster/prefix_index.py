"""What the gateway believes each replica holds in its prefix cache, for affinity routing.

Tracked by the gateway, not reported by the replicas: when a request is sent to a replica, the
chained hashes of its prompt's leading full blocks are recorded for that replica, in a least-
recently-used set bounded by the replica's KV blocks (it cannot cache more). The hashes are the
scheduler's own (`kv_cache_manager.hash_block`: same root, same block size, the cache salt in
the first block), over the blocks the scheduler could reuse (never the one holding the prompt's
last token). The view is optimistic: a replica may have evicted blocks earlier under KV
pressure; it then recomputes them, so a stale entry costs speed, never correctness. A replica
lost or restarted is forgotten (its cache is gone).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

from pagedserve.scheduler.kv_cache_manager import ROOT_HASH, hash_block


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, cache_salt: str | None,
                        max_blocks: int) -> list[bytes]:
    """The chained hashes of the prompt's first full blocks that a prefix cache can serve
    (at most `max_blocks`), exactly as the scheduler hashes them."""
    count = min((len(token_ids) - 1) // block_size, max_blocks) if token_ids else 0
    hashes: list[bytes] = []
    for index in range(count):
        tokens = list(token_ids[index * block_size:(index + 1) * block_size])
        if index == 0:
            hashes.append(hash_block(ROOT_HASH, tokens, cache_salt))
        else:
            hashes.append(hash_block(hashes[-1], tokens, None))
    return hashes


class PrefixIndex:
    """Per replica (any hashable key), an LRU set of block hashes bounded by its capacity."""

    def __init__(self) -> None:
        self._blocks: dict[Hashable, OrderedDict[bytes, None]] = {}

    def matched(self, replica: Hashable, hashes: Sequence[bytes]) -> int:
        """How many of `hashes` (a prompt's chain) the replica holds, from the first on."""
        blocks = self._blocks.get(replica)
        if not blocks:
            return 0
        count = 0
        for block_hash in hashes:
            if block_hash not in blocks:
                break
            count += 1
        return count

    def record(self, replica: Hashable, hashes: Sequence[bytes], capacity: int) -> None:
        """The replica now holds `hashes`; the least recently used beyond `capacity` go. The
        chain is touched from its end, so a parent is always more recent than its children and
        an eviction shortens chains from their tails, as a cache that must keep a prefix
        whole."""
        if capacity <= 0:
            return
        blocks = self._blocks.setdefault(replica, OrderedDict())
        for block_hash in reversed(hashes):
            blocks[block_hash] = None
            blocks.move_to_end(block_hash)
        while len(blocks) > capacity:
            blocks.popitem(last=False)

    def size(self, replica: Hashable) -> int:
        return len(self._blocks.get(replica, ()))

    def forget(self, replica: Hashable) -> None:
        self._blocks.pop(replica, None)
