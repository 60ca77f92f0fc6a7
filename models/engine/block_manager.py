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
    ) -> None:
        assert num_blocks > 0 and block_size > 0
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

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq` (at least one token left over,
        so the last prompt token is always computed and yields logits). Does not acquire."""
        if not self.enable_prefix_caching:
            return []
        hashes = self.block_hashes_for(seq)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        bs = self.block_size
        hits: list[int] = []
        parent = self.root_hash
        for i, h in enumerate(hashes[:max_blocks]):
            block_id = self.hash_to_block_id.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.parent_hash != parent or block.token_ids != tuple(
                seq.token_ids(i * bs, (i + 1) * bs)
            ):
                break  # hash collision: treat as a miss
            hits.append(block_id)
            parent = h
        if self.hit_align_blocks:
            del hits[len(hits) // self.hit_align_blocks * self.hit_align_blocks :]
        return hits

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int, num_reserved: int = 0) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) + num_reserved <= self.num_free_blocks

    def admit(self, seq: Sequence, num_new_tokens_cap: int,
              piece: Callable[[Sequence, int, int], int] | None = None,
              whole_lifetime: bool = False) -> int | None:
        """Start a waiting sequence: reuse its cached prefix, allocate blocks for its first
        chunk. Returns the number of tokens to compute now, None if blocks are short, or 0 if
        `piece(seq, start, cap)` (the scheduler's cut rule) allows nothing this step; nothing
        is changed in the last two cases. `whole_lifetime` (with decode reservation): blocks
        are short unless the whole reservation fits, so an admitted sequence never has to
        preempt another to finish (the scheduler asks this while others are running)."""
        assert not seq.block_table and seq.num_computed_tokens == 0, "admitting a started sequence"
        hits = self.match_prefix(seq)
        # Cached blocks that are free count against the free pool once acquired.
        num_free_hits = sum(1 for b in hits if self.blocks[b].ref_cnt == 0)
        num_cached = len(hits) * self.block_size
        if piece is None:
            num_new = min(seq.num_tokens - num_cached, num_new_tokens_cap)
        else:
            num_new = piece(seq, num_cached, num_new_tokens_cap)
        if num_new <= 0:
            return 0
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
                reserve_blocks = lifetime_blocks - total_blocks
            elif whole_lifetime:
                return None
        for b in hits:
            self._acquire_cached(b)
        seq.block_table = list(hits)
        seq.num_computed_tokens = num_cached
        if seq.num_preemptions == 0:  # a re-admission after preemption is not a new query
            seq.num_cached_tokens = min(num_cached, seq.num_prompt_tokens)
            self.num_queries += seq.num_prompt_tokens
            self.num_hits += seq.num_cached_tokens
        self.release_out_of_window(seq)
        # One allocation for the chunk and the reservation, so they form one run.
        needed = self.num_blocks_needed(seq, num_new) + max(0, reserve_blocks)
        assert needed <= self.num_free_blocks, "admission checked the free pool but it is short"
        self._extend(seq.block_table, needed)
        return num_new

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table to hold `num_new_tokens` more tokens. False if short of blocks."""
        self.release_out_of_window(seq)
        needed = self.num_blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            return False
        self._extend(seq.block_table, needed)
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
        table = seq.block_table
        for i in range(seq.num_released_blocks, min(num_old, len(table))):
            self._release(table[i])
            table[i] = -1
        seq.num_released_blocks = max(seq.num_released_blocks, min(num_old, len(table)))

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that became full with computed K/V (after a forward step)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        hashes = self.block_hashes_for(seq)
        for i in range(num_full):
            block_id = seq.block_table[i]
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
        for block_id in reversed(seq.block_table):
            if block_id >= 0:
                self._release(block_id)
        seq.block_table = []
        seq.num_released_blocks = 0
        seq.num_computed_tokens = 0

    def check_invariants(self) -> None:
        used = sum(1 for b in self.blocks if b.ref_cnt > 0)
        assert used + len(self.free_queue) == self.num_blocks, "free + used != total"
        for b in self.blocks:
            assert b.ref_cnt >= 0
            assert (b.ref_cnt == 0) == (b.block_id in self.free_queue)
        for h, block_id in self.hash_to_block_id.items():
            assert self.blocks[block_id].block_hash == h, "hash index points at a reused block"
