"""Allocator: exact block ids and ref counts, then properties over random workloads."""

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from models.engine.block_manager import BlockManager
from models.engine.sampling import SamplingParams
from models.engine.scheduler import Scheduler
from models.engine.sequence import Sequence, SequenceStatus


def _seq(request_id, tokens, max_tokens=4):
    return Sequence(request_id, tokens, SamplingParams(max_tokens=max_tokens))


def _compute(bm, seq, n):
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq)


def test_exact_ids_refcounts_and_eviction_order():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = _seq("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert bm.admit(a, 64) == 10
    assert a.block_table == [0, 1, 2]
    _compute(bm, a, 10)
    b = _seq("b", list(range(8)) + [99, 98])  # shares a's first two blocks
    assert bm.admit(b, 64) == 2
    assert b.block_table == [0, 1, 3] and b.num_cached_tokens == 8
    assert [bm.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]
    bm.free(a)
    assert list(bm.free_queue)[-1:] == [2]  # a's tail is the only block that became free
    bm.free(b)
    # b freed tail first: 3, then 1, 0 as their last holders let go
    assert list(bm.free_queue)[-4:] == [2, 3, 1, 0]
    # cached blocks stay findable after free
    c = _seq("c", list(range(8)) + [1])
    assert bm.admit(c, 64) == 1 and c.block_table[:2] == [0, 1]
    bm.check_invariants()


def test_never_hits_the_whole_prompt():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq("a", list(range(8)))
    bm.admit(a, 64)
    _compute(bm, a, 8)
    b = _seq("b", list(range(8)))  # identical prompt: the last block must be recomputed
    assert bm.admit(b, 64) == 4
    assert b.num_cached_tokens == 4


def test_preferred_next_block_keeps_tables_consecutive():
    bm = BlockManager(num_blocks=16, block_size=4)
    a, b = _seq("a", list(range(4))), _seq("b", list(range(100, 104)))
    bm.admit(a, 64)
    bm.admit(b, 64)
    _compute(bm, a, 4)
    _compute(bm, b, 4)
    a.output_token_ids.append(5)
    assert bm.allocate(a, 1) and a.block_table == [0, 2]  # 1 (after 0) is b's: first free
    b.output_token_ids.append(5)
    assert bm.allocate(b, 1) and b.block_table == [1, 3]  # 2 (after 1) is a's: first free
    c = _seq("c", list(range(200, 208)))
    bm.admit(c, 64)
    assert c.block_table == [4, 5]  # a fresh sequence gets a consecutive run
    bm.check_invariants()


def test_window_release_frees_old_blocks():
    bm = BlockManager(num_blocks=32, block_size=4, release_window=8)
    a = _seq("a", list(range(30)))
    bm.admit(a, 30)
    _compute(bm, a, 30)
    bm.release_out_of_window(a)
    # next query is position 30; it reads positions 23..30, so blocks 0..4 (0..19) are free
    assert a.block_table[:5] == [-1] * 5 and a.num_released_blocks == 5
    assert bm.num_used_blocks == 3
    bm.check_invariants()


@settings(max_examples=60, deadline=None)
@given(
    num_blocks=st.integers(4, 24),
    block_size=st.sampled_from([2, 4]),
    budget=st.integers(4, 24),
    requests=st.lists(
        st.tuples(st.lists(st.integers(0, 3), min_size=1, max_size=20), st.integers(1, 8)),
        min_size=1, max_size=10,
    ),
    prefix_caching=st.booleans(),
)
def test_random_workloads_keep_allocator_invariants(num_blocks, block_size, budget, requests, prefix_caching):
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=max(budget, block_size))
    seqs = []
    for i, (tokens, max_tokens) in enumerate(requests):
        # skip requests that could never fit (the engine rejects them at add_request)
        if -(-(len(tokens) + max_tokens) // block_size) > num_blocks:
            continue
        s = _seq(str(i), tokens, max_tokens)
        seqs.append(s)
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        steps += 1
        assert steps < 2000, "no progress"
        batch = sched.schedule()
        assert batch.seqs, "nothing scheduled while work remains"
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            _compute(bm, s, n)
            if s.num_computed_tokens == s.num_tokens:
                s.append_token(len(s.output_token_ids) % 3)
                if len(s.output_token_ids) >= s.params.max_tokens:
                    sched.finish(s)
        # invariants: free + used == total; ref counts == holders; none negative
        bm.check_invariants()
        holders = Counter(b for s in sched.running for b in s.block_table if b >= 0)
        for block in bm.blocks:
            assert block.ref_cnt == holders.get(block.block_id, 0)
        for s in sched.waiting:
            assert s.block_table == [] or s.status is SequenceStatus.RUNNING
    assert bm.num_free_blocks == num_blocks
    assert all(len(s.output_token_ids) == s.params.max_tokens for s in seqs)


def test_reserved_generation_blocks_keep_each_table_one_run():
    bm = BlockManager(num_blocks=10, block_size=4, reserve_decode=True)
    a, b = _seq("a", list(range(10)), max_tokens=8), _seq("b", list(range(50, 60)), max_tokens=8)
    assert bm.admit(a, 64) == 10 and bm.admit(b, 64) == 10
    # 10 prompt + 8 generated tokens = 18 tokens = 5 blocks each, taken at admission
    assert a.block_table == [0, 1, 2, 3, 4] and b.block_table == [5, 6, 7, 8, 9]
    for _ in range(8):
        _compute(bm, a, 1 if a.output_token_ids else 10)
        a.append_token(1)
        assert bm.allocate(a, 1) and a.block_table == [0, 1, 2, 3, 4]
    bm.free(a)
    c = _seq("c", list(range(100, 116)), max_tokens=4)  # 20 tokens = 5 blocks
    assert bm.admit(c, 64) == 16
    assert c.block_table == [0, 1, 2, 3, 4]  # a's run came back reversed; sorted it is one run
    bm.check_invariants()


def test_block_hash_is_sha256_of_parent_and_packed_tokens():
    import hashlib
    import struct

    from models.engine import block_manager

    root = block_manager.hash_seed("model-a")
    assert root == hashlib.sha256(b"docpipe-prefix-root\x00model-a").digest()
    assert root != block_manager.hash_seed("model-b")  # the extra key is part of the chain
    tokens = [0, 1, 70_000, 2**31 + 5]
    h = block_manager.chain_hash(root, tokens)
    assert h == hashlib.sha256(root + struct.pack("<4q", *tokens)).digest()
    # Pinned: the same in every process and Python version (reproducible tests and caches).
    assert h.hex()[:16] == "1b2a11530e9dc94a"
    assert block_manager.chain_hash(h, tokens) != h  # chained: position in the prefix counts
    bm = BlockManager(num_blocks=4, block_size=4, extra_key="model-a")
    a = _seq("a", tokens + [9])
    bm.admit(a, 64)
    _compute(bm, a, 5)
    assert list(bm.hash_to_block_id) == [h] and bm.blocks[0].block_hash == h


def test_a_hash_collision_is_a_miss_not_wrong_kv(monkeypatch):
    from models.engine import block_manager

    monkeypatch.setattr(block_manager, "chain_hash", lambda parent, tokens: b"\x00" * 32)
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq("a", list(range(9)))
    bm.admit(a, 64)
    _compute(bm, a, 9)
    b = _seq("b", list(range(100, 109)))  # every block hash collides with a's
    assert bm.admit(b, 64) == 9 and b.num_cached_tokens == 0
    bm.check_invariants()
