"""KV-cache block pool: block ids, reference counts, prefix hashes, eviction order.

Rules of the data structure:
- Every block is either used (`ref_cnt > 0`, held by one or more block tables) or free
  (`ref_cnt == 0`, in `free_queue`). Free + used == total, always.
- `free_queue` is kept in eviction order (least recently freed first). A sequence frees its
  blocks tail first, so a chain's tail is evicted before its parents and a cached prefix
  stays usable as long as possible.
- Only full blocks are hashed. A block hash is the sha256 digest (32 bytes) of (parent block
  hash, the block's token ids as little-endian int64), chained from a root that is the sha256
  of the extra keys (the model fingerprint), so equal hashes mean equal prefixes of the same
  model. sha256, not Python's `hash()`: a tuple hash is cheap to collide on purpose, and a
  collision lets one prompt evict or shadow another's cached prefix (vLLM advisory
  GHSA-rm76-4mrf-v9r8). A hit also compares the stored tokens and parent hash (even a
  collision never returns wrong K/V). The root depends only on `extra_key`, so hashes are
  the same in every process and run (reproducible tests).
- A freed block keeps its hash and stays findable until it is reused for other tokens.
- Allocation continues a sequence's last run of blocks when it can, and with
  `reserve_decode` a sequence takes the blocks for its whole generation at admission, so
  block tables are few consecutive runs and attention reads K/V in place.

One `BlockManager` is one pool: it serves one KV cache group, the layers that share a window,
through `seq.block_tables[group]`. A model mixing full and sliding-window layers has one pool
per group, coordinated by `HybridBlockManager` (below).
"""

from __future__ import annotations

import hashlib
import itertools
import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable

from models.engine.sequence import Sequence

BlockHash = bytes  # a sha256 digest, 32 bytes

_BIG_ENDIAN = sys.byteorder == "big"


def hash_seed(extra_key: str) -> BlockHash:
    """Root of the hash chain: the same in every process (Python's str hash is salted)."""
    key = extra_key.encode("utf-8", "surrogatepass")
    return hashlib.sha256(b"docpipe-prefix-root\x00" + key).digest()


def chain_hash(parent_hash: BlockHash, token_ids) -> BlockHash:
    """sha256(parent hash || token ids as little-endian int64). The parent is always 32 bytes
    and only full blocks are hashed, so the fields cannot run into each other."""
    packed = array("q", token_ids)
    if _BIG_ENDIAN:
        packed.byteswap()
    return hashlib.sha256(parent_hash + packed.tobytes()).digest()


def _first_piece(seq: Sequence, num_cached: int, cap: int,
                 piece: Callable[[Sequence, int, int], int] | None) -> int:
    if piece is None:
        return min(seq.num_tokens - num_cached, cap)
    return piece(seq, num_cached, cap)


def first_needed_block(num_tokens: int, window: int | None, block_size: int) -> int:
    """The first block a query at position `num_tokens` reads under `window` (None: 0): its
    keys are positions [num_tokens - window + 1, num_tokens]."""
    if window is None:
        return 0
    return max(0, num_tokens - window + 1) // block_size


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "parent_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.parent_hash: BlockHash | None = None
        self.token_ids: tuple[int, ...] | None = None


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        extra_key: str = "",
        release_window: int | None = None,
        reserve_decode: bool = False,
        max_reserve_tokens: int = 1024,
        hit_align: int | None = None,
        group: int = 0,
    ) -> None:
        assert num_blocks > 0 and block_size > 0
        self.group = group  # which of a sequence's block tables this pool serves
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.root_hash = hash_seed(extra_key)
        # Positions older than this many tokens before the next query are never read again.
        self.release_window = release_window
        # Take a sequence's generation blocks at admission (see `admit`).
        self.reserve_decode = reserve_decode and release_window is None
        self.max_reserve_tokens = max_reserve_tokens
        # Batch-invariant engines reuse a cached prefix only in whole multiples of this many
        # tokens: K/V past the last such boundary of another prompt were computed by a
        # different attention call than this prompt would make (see models.attention).
        assert hit_align is None or hit_align % block_size == 0
        self.hit_align_blocks = None if hit_align is None else hit_align // block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block_id: dict[BlockHash, int] = {}
        self.num_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_hits = 0  # of those, tokens served from it

    # -- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.num_hits / self.num_queries if self.num_queries else 0.0

    # -- block level ------------------------------------------------------------------------
    def _take_free(self, block_id: int) -> Block:
        block = self.blocks[block_id]
        assert block.ref_cnt == 0, f"block {block_id} in free queue with ref_cnt {block.ref_cnt}"
        del self.free_queue[block_id]
        block.ref_cnt = 1
        return block

    def _allocate_block(self, block_id: int) -> int:
        """Take free block `block_id`, evicting the cached content it held."""
        block = self._take_free(block_id)
        if block.block_hash is not None:  # evict its cached content
            if self.hash_to_block_id.get(block.block_hash) == block_id:
                del self.hash_to_block_id[block.block_hash]
            block.block_hash = block.parent_hash = block.token_ids = None
        return block_id

    def _acquire_cached(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_cnt == 0:
            self._take_free(block_id)
        else:
            block.ref_cnt += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_cnt > 0, f"block {block_id} released with ref_cnt 0: freed twice?"
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            self.free_queue[block_id] = None

    # -- sequence level ---------------------------------------------------------------------
    def block_hashes_for(self, seq: Sequence) -> list[BlockHash]:
        """Chain hashes of all full blocks of the sequence's known tokens (extends a cache)."""
        hashes = seq.block_hashes
        bs = self.block_size
        num_full = seq.num_tokens // bs
        parent = hashes[-1] if hashes else self.root_hash
        for i in range(len(hashes), num_full):
            parent = chain_hash(parent, seq.token_ids(i * bs, (i + 1) * bs))
            hashes.append(parent)
        return hashes

    def cached_block(self, seq: Sequence, hashes: list[BlockHash], i: int) -> int | None:
        """The id of the cached block holding block i of `seq`, or None. Checks the stored
        parent hash and tokens too: a hash collision is a miss, never wrong K/V."""
        block_id = self.hash_to_block_id.get(hashes[i])
        if block_id is None:
            return None
        block = self.blocks[block_id]
        bs = self.block_size
        parent = hashes[i - 1] if i else self.root_hash
        if block.parent_hash != parent or block.token_ids != tuple(
                seq.token_ids(i * bs, (i + 1) * bs)):
            return None
        return block_id

    def cached_run(self, seq: Sequence, hashes: list[BlockHash], num_blocks: int) -> list[int]:
        """Ids of the longest run of cached blocks 0, 1, ... (at most `num_blocks`)."""
        hits: list[int] = []
        for i in range(min(num_blocks, len(hashes))):
            block_id = self.cached_block(seq, hashes, i)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq` (at least one token left over,
        so the last prompt token is always computed and yields logits). Does not acquire."""
        if not self.enable_prefix_caching:
            return []
        hashes = self.block_hashes_for(seq)
        hits = self.cached_run(seq, hashes, (seq.num_tokens - 1) // self.block_size)
        if self.hit_align_blocks:
            del hits[len(hits) // self.hit_align_blocks * self.hit_align_blocks :]
        return hits

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_tables[self.group]))

    def can_allocate(self, seq: Sequence, num_new_tokens: int, num_reserved: int = 0) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) + num_reserved <= self.num_free_blocks

    def fits(self, num_tokens: int) -> bool:
        """Whether a prompt of `num_tokens` can ever be held (a windowed pool releases)."""
        return self.release_window is not None or -(-num_tokens // self.block_size) <= self.num_blocks

    def admit(self, seq: Sequence, num_new_tokens_cap: int,
              piece: Callable[[Sequence, int, int], int] | None = None,
              whole_lifetime: bool = False) -> int | None:
        """Start a waiting sequence: reuse its cached prefix, allocate blocks for its first
        chunk. Returns the number of tokens to compute now, None if blocks are short, or 0 if
        `piece(seq, start, cap)` (the scheduler's cut rule) allows nothing this step; nothing
        is changed in the last two cases. `whole_lifetime` (with decode reservation): blocks
        are short unless the whole reservation fits, so an admitted sequence never has to
        preempt another to finish (the scheduler asks this while others are running)."""
        hits = self.match_prefix(seq)
        num_cached = len(hits) * self.block_size
        num_new = _first_piece(seq, num_cached, num_new_tokens_cap, piece)
        if num_new <= 0:
            return 0
        reserve_blocks = self.admission(seq, hits, num_cached, num_new, whole_lifetime)
        if reserve_blocks is None:
            return None
        self.start(seq, hits, num_cached, num_new, reserve_blocks)
        if seq.num_preemptions == 0:  # a re-admission after preemption is not a new query
            self.num_queries += seq.num_prompt_tokens
            self.num_hits += seq.num_cached_tokens
        return num_new

    def admission(self, seq: Sequence, hits: list[int], num_cached: int, num_new: int,
                  whole_lifetime: bool) -> int | None:
        """The check half of `admit` for cached blocks `hits` (-1: a position this pool need
        not hold) and a first piece of `num_new` tokens: the number of decode blocks to
        reserve, or None if this pool is short. Changes nothing."""
        assert not seq.block_tables[self.group] and seq.num_computed_tokens == 0, \
            "admitting a started sequence"
        # Cached blocks that are free count against the free pool once acquired.
        num_free_hits = sum(1 for b in hits if b >= 0 and self.blocks[b].ref_cnt == 0)
        total_blocks = -(-(num_cached + num_new) // self.block_size)
        if total_blocks - len(hits) + num_free_hits > self.num_free_blocks:
            return None
        # Reserve the blocks for the rest of the prompt and the whole generation now, when
        # they can still be one consecutive run (attention then reads K/V in place).
        reserve_blocks = 0
        if self.reserve_decode:
            lifetime = seq.num_tokens + min(seq.params.max_tokens or 0, self.max_reserve_tokens)
            lifetime_blocks = -(-lifetime // self.block_size)
            if lifetime_blocks - len(hits) + num_free_hits <= self.num_free_blocks:
                reserve_blocks = max(0, lifetime_blocks - total_blocks)
            elif whole_lifetime:
                return None
        return reserve_blocks

    def start(self, seq: Sequence, hits: list[int], num_cached: int, num_new: int,
              reserve_blocks: int) -> None:
        """The action half of `admit`, after `admission` returned `reserve_blocks`."""
        for b in hits:
            if b >= 0:
                self._acquire_cached(b)
        table = seq.block_tables[self.group] = list(hits)
        seq.num_released[self.group] = sum(1 for b in hits if b < 0)  # leading, never taken
        seq.num_computed_tokens = num_cached
        if seq.num_preemptions == 0:  # a re-admission keeps the first admission's count
            seq.num_cached_tokens = min(num_cached, seq.num_prompt_tokens)
        self.release_out_of_window(seq)
        # One allocation for the chunk and the reservation, so they form one run.
        needed = self.num_blocks_needed(seq, num_new) + reserve_blocks
        assert needed <= self.num_free_blocks, "admission checked the free pool but it is short"
        self._extend(table, needed)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table to hold `num_new_tokens` more tokens. False if short of blocks."""
        self.release_out_of_window(seq)
        needed = self.num_blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            return False
        self._extend(seq.block_tables[self.group], needed)
        return True

    def _extend(self, table: list[int], n: int) -> None:
        """Append n blocks: continue the table's last run while those blocks are free, then
        take from the head of the free queue in ascending id order (a sequence that freed
        its run tail first gives it back reversed; sorting makes it one run again)."""
        nxt = table[-1] + 1 if table and table[-1] >= 0 else None
        while n and nxt is not None and nxt < self.num_blocks and nxt in self.free_queue:
            table.append(self._allocate_block(nxt))
            nxt += 1
            n -= 1
        if n:
            ids = sorted(itertools.islice(self.free_queue, n))
            table.extend(self._allocate_block(b) for b in ids)

    def release_out_of_window(self, seq: Sequence) -> None:
        """Free the blocks whose positions every windowed layer has moved past."""
        if self.release_window is None:
            return
        first_needed = seq.num_computed_tokens - self.release_window + 1
        num_old = max(0, first_needed) // self.block_size
        g = self.group
        table = seq.block_tables[g]
        for i in range(seq.num_released[g], min(num_old, len(table))):
            self._release(table[i])
            table[i] = -1
        seq.num_released[g] = max(seq.num_released[g], min(num_old, len(table)))

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that became full with computed K/V (after a forward step)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        hashes = self.block_hashes_for(seq)
        for i in range(num_full):
            block_id = seq.block_tables[self.group][i]
            if block_id < 0:
                continue
            block = self.blocks[block_id]
            if block.block_hash is not None:
                continue
            block.block_hash = hashes[i]
            block.parent_hash = hashes[i - 1] if i else self.root_hash
            block.token_ids = tuple(seq.token_ids(i * bs, (i + 1) * bs))
            self.hash_to_block_id.setdefault(hashes[i], block_id)

    def free(self, seq: Sequence) -> None:
        """Release all of a sequence's blocks, tail first (tails are evicted before parents)."""
        g = self.group
        for block_id in reversed(seq.block_tables[g]):
            if block_id >= 0:
                self._release(block_id)
        seq.block_tables[g] = []
        seq.num_released[g] = 0
        seq.num_computed_tokens = 0

    def check_invariants(self) -> None:
        used = sum(1 for b in self.blocks if b.ref_cnt > 0)
        assert used + len(self.free_queue) == self.num_blocks, "free + used != total"
        for b in self.blocks:
            assert b.ref_cnt >= 0
            assert (b.ref_cnt == 0) == (b.block_id in self.free_queue)
        for h, block_id in self.hash_to_block_id.items():
            assert self.blocks[block_id].block_hash == h, "hash index points at a reused block"


class HybridBlockManager:
    """One block pool per KV cache group, for a model whose layers differ in window (gemma3:
    5 sliding-window layers of every 6, one full-attention layer); vLLM's hybrid allocator,
    with a pool per group instead of one shared pool.

    Rules:
    - `groups[g]` serves `seq.block_tables[g]`; its blocks hold K/V of group g's layers only
      (the runner sizes each group's tensors for its layers). All groups share block_size and
      the block hash chain (the same tokens give the same hashes in every pool).
    - A sliding group (window W) releases the blocks that every query to come has moved past
      (`BlockManager.release_out_of_window`), so a sequence holds about W / block_size blocks
      plus its current piece there, while a full group keeps all its blocks.
    - Every decision covers all groups: a sequence is admitted or grown only if every group
      has the blocks (checked in all before any is taken), and a shortfall in any group
      preempts, freeing the victim's blocks in all groups.
    - A prefix hit of N tokens must be a hit in every group: a full group holds all N tokens'
      blocks, a sliding group the blocks that the query at position N reads, [N - W + 1, N)
      (`first_needed_block`); its table has -1 before those. N is the longest such length,
      at most the full groups' longest cached run, in whole `hit_align` multiples.
    """

    def __init__(self, num_blocks: list[int], block_size: int, windows: list[int | None],
                 enable_prefix_caching: bool = True, extra_key: str = "",
                 reserve_decode: bool = False, max_reserve_tokens: int = 1024,
                 hit_align: int | None = None) -> None:
        assert len(num_blocks) == len(windows) >= 1
        self.windows = list(windows)
        self.groups = [
            BlockManager(n, block_size, enable_prefix_caching, extra_key, release_window=w,
                         reserve_decode=reserve_decode, max_reserve_tokens=max_reserve_tokens,
                         hit_align=hit_align, group=g)
            for g, (n, w) in enumerate(zip(num_blocks, windows))
        ]
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hit_align_blocks = self.groups[0].hit_align_blocks
        self.release_window = None  # some group keeps every block
        self.reserve_decode = any(g.reserve_decode for g in self.groups)
        self.num_queries = 0
        self.num_hits = 0

    # -- accounting (summed over the pools) -------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return sum(g.num_blocks for g in self.groups)

    @property
    def num_free_blocks(self) -> int:
        return sum(g.num_free_blocks for g in self.groups)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """The fullest pool's usage: the one that runs out first."""
        return max(g.usage for g in self.groups)

    @property
    def hit_rate(self) -> float:
        return self.num_hits / self.num_queries if self.num_queries else 0.0

    def fits(self, num_tokens: int) -> bool:
        return all(g.fits(num_tokens) for g in self.groups)

    # -- prefix cache -----------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> tuple[int, list[list[int]]]:
        """(N, per group the block ids of a prefix hit of N blocks, -1 where a sliding group
        need not hold the block). Does not acquire."""
        empty = [[] for _ in self.groups]
        if not self.enable_prefix_caching:
            return 0, empty
        bs = self.block_size
        hashes = self.groups[0].block_hashes_for(seq)
        limit = (seq.num_tokens - 1) // bs
        full_runs = {}
        for g, w in zip(self.groups, self.windows):
            if w is None:
                full_runs[g.group] = g.cached_run(seq, hashes, limit)
                limit = len(full_runs[g.group])
        # Sliding groups: which blocks below the limit are cached (any of them may be).
        cached = {g.group: [g.cached_block(seq, hashes, i) for i in range(limit)]
                  for g, w in zip(self.groups, self.windows) if w is not None}
        step = self.hit_align_blocks or 1
        n = limit // step * step
        while n > 0:
            if all(None not in cached[g][first_needed_block(n * bs, self.windows[g], bs):n]
                   for g in cached):
                break
            n -= step
        if n <= 0:
            return 0, empty
        hits = []
        for g, w in enumerate(self.windows):
            if w is None:
                hits.append(full_runs[g][:n])
            else:
                lo = first_needed_block(n * bs, w, bs)
                hits.append([-1] * lo + cached[g][lo:n])
        return n, hits

    # -- sequence level ---------------------------------------------------------------------
    def admit(self, seq: Sequence, num_new_tokens_cap: int,
              piece: Callable[[Sequence, int, int], int] | None = None,
              whole_lifetime: bool = False) -> int | None:
        """`BlockManager.admit` over every group: all of them have the blocks, or nothing."""
        assert len(seq.block_tables) == len(self.groups), \
            f"sequence has {len(seq.block_tables)} block tables for {len(self.groups)} groups"
        num_hit, hits = self.match_prefix(seq)
        num_cached = num_hit * self.block_size
        num_new = _first_piece(seq, num_cached, num_new_tokens_cap, piece)
        if num_new <= 0:
            return 0
        reserves = []
        for g, group_hits in zip(self.groups, hits):
            reserve = g.admission(seq, group_hits, num_cached, num_new, whole_lifetime)
            if reserve is None:
                return None
            reserves.append(reserve)
        for g, group_hits, reserve in zip(self.groups, hits, reserves):
            g.start(seq, group_hits, num_cached, num_new, reserve)
        if seq.num_preemptions == 0:
            self.num_queries += seq.num_prompt_tokens
            self.num_hits += seq.num_cached_tokens
        return num_new

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow every group's table for `num_new_tokens` more tokens; False (nothing taken)
        if any group is short."""
        for g in self.groups:
            g.release_out_of_window(seq)
        if any(g.num_blocks_needed(seq, num_new_tokens) > g.num_free_blocks for g in self.groups):
            return False
        for g in self.groups:
            grown = g.allocate(seq, num_new_tokens)
            assert grown, "a group checked its free pool but it is short"
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that became full, then release the sliding groups' blocks
        behind the next query's window at once: a sequence that sits out the next step
        (budget) holds only its window, which is what the sliding pool is sized for."""
        for g in self.groups:
            g.cache_full_blocks(seq)
            g.release_out_of_window(seq)

    def free(self, seq: Sequence) -> None:
        for g in self.groups:
            g.free(seq)

    def check_invariants(self) -> None:
        for g in self.groups:
            g.check_invariants()
