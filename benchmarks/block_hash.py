"""Prefix-cache block hash cost: sha256 over (parent hash, packed token ids) per full block.

    .venv/bin/python benchmarks/block_hash.py --block-size 16 --num-blocks 20000

Prints one line: "prefix hash: X us per block" (the chain as the block manager computes it,
from a list of Python ints, as a sequence's token ids are held), and the old tuple `hash()`
for comparison.
"""

from __future__ import annotations

import argparse
import random
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from models.engine.block_manager import chain_hash, hash_seed

    rng = random.Random(0)
    blocks = [[rng.randrange(150_000) for _ in range(args.block_size)] for _ in range(args.num_blocks)]
    root = hash_seed("bench")

    def sha_chain():
        parent = root
        for toks in blocks:
            parent = chain_hash(parent, toks)

    def tuple_chain():
        parent = 0
        for toks in blocks:
            parent = hash((parent, tuple(toks)))

    for name, fn in (("prefix hash", sha_chain), ("tuple hash() (before)", tuple_chain)):
        fn()  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        print(f"{name}: {best / args.num_blocks * 1e6:.2f} us per block "
              f"(block_size {args.block_size}, {args.num_blocks} blocks, best of {args.repeats})")


if __name__ == "__main__":
    main()
