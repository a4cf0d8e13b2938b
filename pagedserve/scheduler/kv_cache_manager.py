"""Block tables, prefix caching, fork with copy-on-write, and swapping to a CPU block pool.

Every request owns a block table: logical block i holds tokens [i*B, (i+1)*B). Full blocks are
indexed by a chained hash (parent hash and the block's token ids; the first block's also takes
the request's cache salt, which the chain then carries to every later block), so a new request
whose prompt starts with the same tokens (and salt) reuses those physical blocks. Plain data
in and out: block ids, (src, dst) pairs; the workers move the bytes.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from dataclasses import dataclass, field

from pagedserve.scheduler.block_pool import BlockPool
from pagedserve.scheduler.request import Request

ROOT_HASH = b"pagedserve-root"


def hash_block(parent_hash: bytes, token_ids: list[int], extra_key: str | None) -> bytes:
    """Chained hash of one full block: equal only if the whole prefix up to it (and the extra
    key of its first block) is equal."""
    digest = hashlib.sha256(parent_hash)
    digest.update(array("q", token_ids).tobytes())
    if extra_key is not None:
        digest.update(b"\x00salt:" + extra_key.encode())
    return digest.digest()


@dataclass
class TableUpdate:
    """How a request's block table changed: table[start:] is replaced by block_ids."""

    start: int
    block_ids: list[int]
    copies: list[tuple[int, int]] = field(default_factory=list)
    """Copy-on-write operations (src block, dst block) to run before this step's writes."""


class KVCacheManager:
    """Owns the GPU block pool, per-request block tables and the CPU swap pool."""

    def __init__(self, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int = 0,
                 enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_gpu_blocks, enable_caching=enable_prefix_caching)
        self.cpu_pool = BlockPool(num_cpu_blocks, enable_caching=False) if num_cpu_blocks else None
        self.block_tables: dict[str, list[int]] = {}
        self.cpu_block_tables: dict[str, list[int]] = {}
        self.num_hashed_blocks: dict[str, int] = {}
        """Request id -> how many of its leading blocks are indexed in the prefix cache."""
        self.newly_cached: list[int] = []
        """Blocks indexed since the scheduler last took this list (see
        SchedulerOutput.cached_block_ids)."""

    # ---- prefix cache -------------------------------------------------------------------

    def _extend_hashes(self, request: Request, num_tokens: int) -> None:
        """Make sure request.block_hashes covers every full block among its first tokens."""
        size = self.block_size
        hashes = request.block_hashes
        for index in range(len(hashes), num_tokens // size):
            tokens = request.token_ids(index * size, (index + 1) * size)
            if index == 0:  # the salt enters the chain once; every later hash depends on it
                hashes.append(hash_block(ROOT_HASH, tokens, request.cache_salt))
            else:
                hashes.append(hash_block(hashes[-1], tokens, None))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Cached blocks matching the request's leading full blocks, never covering its last token.

        The last token is always recomputed because its logits are needed to sample. Requests
        asking for prompt logprobs get no hits: those need logits at every prompt position.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._extend_hashes(request, max_blocks * self.block_size)
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def cache_computed_blocks(self, request: Request) -> None:
        """Index the request's blocks that are full and whose KV has been computed."""
        if not self.enable_prefix_caching:
            return
        # Called for every scheduled request twice a step, nearly always with no block newly
        # full: that answer comes first, with Request's length properties inlined.
        # Tokens past num_tokens are pending samples: their ids (and so the hash) are unknown.
        computed = request.num_computed_tokens
        num_tokens = len(request.prompt_token_ids) + len(request.output_token_ids)
        num_full = (computed if computed < num_tokens else num_tokens) // self.block_size
        done = self.num_hashed_blocks.get(request.request_id, 0)
        if num_full <= done:
            return
        table = self.block_tables[request.request_id]
        num_full = min(num_full, len(table))
        if num_full <= done:
            return
        self._extend_hashes(request, num_full * self.block_size)
        for index in range(done, num_full):
            self.pool.cache(table[index], request.block_hashes[index])
            self.newly_cached.append(table[index])
        self.num_hashed_blocks[request.request_id] = num_full

    # ---- allocation ---------------------------------------------------------------------

    def blocks_needed(self, request: Request, num_new_tokens: int,
                      cached_blocks: list[int] = ()) -> int:
        """Free blocks an allocate_slots call would take (cached hits that are free count too)."""
        table = self.block_tables.get(request.request_id, ())
        total = request.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        needed = -(-total // self.block_size) - len(table) - len(cached_blocks)
        needed += sum(1 for b in cached_blocks if self.pool.ref_counts[b] == 0)
        if self._needs_copy_on_write(request, table, num_new_tokens):
            needed += 1
        return max(needed, 0)

    def _needs_copy_on_write(self, request: Request, table, num_new_tokens: int) -> bool:
        offset = request.num_computed_tokens % self.block_size
        if num_new_tokens == 0 or offset == 0 or not table:
            return False
        return self.pool.ref_counts[table[request.num_computed_tokens // self.block_size]] > 1

    def fits_in_place(self, request: Request, num_new_tokens: int, table: list[int]) -> bool:
        """Whether num_new_tokens more tokens fit the request's block table as it is: no new
        block, and the block written first is this request's alone (no copy-on-write), so
        allocate_slots would change nothing. running.py inlines this test for decodes."""
        computed = request.num_computed_tokens
        size = self.block_size
        return computed + num_new_tokens <= len(table) * size and (
            not computed % size or self.pool.ref_counts[table[computed // size]] == 1)

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       cached_blocks: list[int] = (), reserve: int = 0) -> TableUpdate | None:
        """Make room for num_new_tokens more tokens (after any cached prefix blocks).

        Returns None, changing nothing, when that would leave fewer than `reserve` blocks free.
        A shared, partially filled last block is copied first (copy-on-write).
        """
        request_id = request.request_id
        table = self.block_tables.get(request_id)
        if table is not None and not cached_blocks and not reserve and \
                self.fits_in_place(request, num_new_tokens, table):
            return TableUpdate(len(table), [])
        created = table is None
        if created:
            table = self.block_tables[request_id] = []
        needed = self.blocks_needed(request, num_new_tokens, cached_blocks)
        if needed + reserve > self.pool.num_free_blocks:
            if created:  # drop only a table made by this call (a forked one may be empty)
                del self.block_tables[request_id]
            return None
        start = len(table)
        copies = []
        if cached_blocks:
            self.pool.share(cached_blocks)
            table.extend(cached_blocks)
            self.num_hashed_blocks[request_id] = len(table)
        if self._needs_copy_on_write(request, table, num_new_tokens):
            index = request.num_computed_tokens // self.block_size
            (fresh,) = self.pool.allocate(1)
            copies.append((table[index], fresh))
            self.pool.free([table[index]])
            table[index] = fresh
            start = min(start, index)
        total = request.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        missing = -(-total // self.block_size) - len(table)
        if missing > 0:
            table.extend(self.pool.allocate(missing))
        return TableUpdate(start, table[start:], copies)

    def free(self, request_id: str) -> None:
        """Return a request's blocks (last block first, so prefix tails are evicted first)."""
        table = self.block_tables.pop(request_id, None)
        if table:
            self.pool.free(reversed(table))
        self.num_hashed_blocks.pop(request_id, None)
        cpu_table = self.cpu_block_tables.pop(request_id, None)
        if cpu_table:
            self.cpu_pool.free(cpu_table)

    def fork(self, parent_id: str, child_id: str) -> list[int]:
        """Give child_id a block table sharing every block of parent_id (ref counts + 1)."""
        if child_id in self.block_tables:
            raise ValueError(f"request {child_id!r} already has a block table")
        table = list(self.block_tables.get(parent_id, ()))
        self.pool.share(table)
        self.block_tables[child_id] = table
        self.num_hashed_blocks[child_id] = self.num_hashed_blocks.get(parent_id, 0)
        return table

    # ---- swapping -----------------------------------------------------------------------
    # Requests that share blocks (the sequences of one n > 1 request or beam family) move
    # together: a shared block gets one copy in the other pool, with its ref count kept.

    def can_swap_out(self, request_ids: list[str]) -> bool:
        """Whether the CPU pool has a free block for each distinct block of these requests."""
        if self.cpu_pool is None:
            return False
        blocks = {b for request_id in request_ids for b in self.block_tables[request_id]}
        return len(blocks) <= self.cpu_pool.num_free_blocks

    def swap_out(self, request_ids: list[str]) -> list[tuple[int, int]]:
        """Move the requests' blocks to the CPU pool; (gpu block, cpu block) pairs."""
        tables = [self.block_tables.pop(request_id) for request_id in request_ids]
        cpu_tables, pairs = _copy_tables(tables, self.cpu_pool)
        for request_id, table, cpu_table in zip(request_ids, tables, cpu_tables, strict=True):
            self.pool.free(reversed(table))
            self.num_hashed_blocks.pop(request_id, None)
            self.cpu_block_tables[request_id] = cpu_table
        return pairs

    def blocks_to_swap_in(self, request_ids: list[str], first: Request,
                          num_new_tokens: int) -> int:
        """GPU blocks that swap_in(request_ids) takes, plus those that `first` (one of them)
        then needs for num_new_tokens more tokens."""
        references = Counter(b for request_id in request_ids
                             for b in self.cpu_block_tables[request_id])
        table = self.cpu_block_tables[first.request_id]
        computed = first.num_computed_tokens
        needed = len(references) + max(
            self.num_blocks_for(computed + num_new_tokens) - len(table), 0)
        # A partly filled block shared within the group is copied on first write.
        if num_new_tokens and computed % self.block_size and \
                references[table[computed // self.block_size]] > 1:
            needed += 1
        return needed

    def swap_in(self, request_ids: list[str], reserve: int = 0) -> list[tuple[int, int]] | None:
        """Bring swapped requests' blocks back; (cpu block, gpu block) pairs, or None (changing
        nothing) when that would leave fewer than `reserve` GPU blocks free."""
        cpu_tables = [self.cpu_block_tables[request_id] for request_id in request_ids]
        if len({b for table in cpu_tables for b in table}) + reserve > self.pool.num_free_blocks:
            return None
        tables, pairs = _copy_tables(cpu_tables, self.pool)
        for request_id, cpu_table, table in zip(request_ids, cpu_tables, tables, strict=True):
            del self.cpu_block_tables[request_id]
            self.cpu_pool.free(cpu_table)
            self.block_tables[request_id] = table
        return pairs

    # ---- introspection ------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def check_invariants(self) -> None:
        """Ref counts equal table references; free lists hold exactly the unreferenced blocks;
        the prefix-cache index matches the blocks' hashes (both pools)."""
        references = [0] * self.pool.num_blocks
        for table in self.block_tables.values():
            for block_id in table:
                references[block_id] += 1
        if references != self.pool.ref_counts:
            pairs = enumerate(zip(references, self.pool.ref_counts, strict=True))
            bad = [i for i, (a, b) in pairs if a != b]
            raise AssertionError(f"ref counts differ from table references at blocks {bad[:10]}")
        free = self.pool.free_block_ids()
        if len(free) != len(set(free)):
            raise AssertionError("a block is on a free list twice")
        unreferenced = {i for i, count in enumerate(references) if count == 0}
        if set(free) != unreferenced:
            raise AssertionError("free lists differ from the set of unreferenced blocks")
        self.pool.check_invariants()
        if self.cpu_pool is not None:
            cpu_refs = [0] * self.cpu_pool.num_blocks
            for table in self.cpu_block_tables.values():
                for block_id in table:
                    cpu_refs[block_id] += 1
            if cpu_refs != self.cpu_pool.ref_counts:
                raise AssertionError("CPU pool ref counts differ from CPU table references")
            cpu_free = self.cpu_pool.free_block_ids()
            if sorted(cpu_free) != [i for i, count in enumerate(cpu_refs) if count == 0]:
                raise AssertionError("CPU free list differs from the unreferenced CPU blocks")
            self.cpu_pool.check_invariants()


def _copy_tables(tables: list[list[int]], pool: BlockPool
                 ) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """The tables rewritten onto fresh blocks of `pool`, one per distinct source block and
    referenced once per entry, and the (source, copy) pairs in first-use order."""
    sources = list(dict.fromkeys(b for table in tables for b in table))
    copy_of = dict(zip(sources, pool.allocate(len(sources)), strict=True))
    copies = [[copy_of[b] for b in table] for table in tables]
    # allocate() gave each copy one reference; each further entry naming it adds one.
    entries = Counter(b for table in copies for b in table)
    pool.share([b for b, count in entries.items() for _ in range(count - 1)])
    return copies, list(copy_of.items())
