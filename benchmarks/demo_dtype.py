"""`make demo`'s run on an (emulated) AVX2-only CPU: docpipe's default dtype against bf16.

    python benchmarks/demo_dtype.py [--limit N] [--isa avx2|native] [--max-summary-tokens N]

Runs `docpipe -v run examples/sotu -o <tmp>.parquet --no-ray` twice as a subprocess, with
`models.cpu.isa_environment("avx2")` in its environment (docpipe's dtype choice and kernels and
PyTorch/oneDNN/MKL behave as on an AVX2 CPU without bf16 dot products): once with the default
dtype, once with `--dtype bfloat16`. `make demo` runs the same command under scripts/netns with
Ray; here the model runs in the docpipe process (--no-ray), so the comparison holds the engine
work and leaves out Ray's start-up.

Prints, for each run, the run loop's time (the closing table's "wall time": from the first
document in to the last result out, model load excluded) and the dtype the run used (a "dtype"
row of the closing table where there is one, else the model-load log line), then the ratio of
the bf16 run's time to the default run's (goal >= 3). Before the timed runs, the native kernels
are built once under the same environment, so neither run pays for the compiler.
`--limit N` processes only the first N documents (smoke runs).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = common.ROOT
DEMO_INPUT = ROOT / "examples" / "sotu"
WALL = re.compile(r"^wall time\s+([\d.]+) s", re.M)
BUSY = re.compile(r"busy ([\d.]+) s")
TABLE_DTYPE = re.compile(r"^dtype\s+(\w+)(?: \(KV cache (\w+)\))?", re.M)
LOG_DTYPE = re.compile(r"loaded \S+ \([^,]+, torch\.(\w+)\)")


def docpipe_command() -> list[str]:
    script = Path(sys.executable).parent / "docpipe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]


def build_kernels(env: dict[str, str]) -> None:
    """Compile (or find cached) the native kernels for this ISA level, untimed."""
    code = ("from models import native\n"
            "try:\n    native.library()\nexcept Exception as exc:\n    print(exc)\n")
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_demo(extra: list[str], env: dict[str, str], args, out_dir: Path, name: str) -> dict:
    out = out_dir / f"{name}.parquet"
    cmd = [*docpipe_command(), "-v", "run", str(args.input), "-o", str(out), "--no-ray", *extra]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    if args.max_summary_tokens:
        cmd += ["--max-summary-tokens", str(args.max_summary_tokens)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    wall = WALL.search(log)
    if proc.returncode != 0 or wall is None:
        tail = "\n".join(log.splitlines()[-15:])
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    row = TABLE_DTYPE.search(log)
    if row:
        dtype = row.group(1) + (f", KV cache {row.group(2)}" if row.group(2) else "")
    else:
        loaded = LOG_DTYPE.search(log)
        dtype = loaded.group(1) if loaded else "? (not in the output)"
    busy = BUSY.search(log)
    return dict(cmd=cmd, wall=float(wall.group(1)), process=elapsed, dtype=dtype,
                busy=float(busy.group(1)) if busy else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=DEMO_INPUT)
    ap.add_argument("--limit", type=int, default=None, help="process only the first N documents")
    ap.add_argument("--max-summary-tokens", type=int, default=None,
                    help="passed to docpipe run (default: its own)")
    ap.add_argument("--isa", choices=common.ISA_CHOICES, default="avx2",
                    help="the environment both runs get (default avx2)")
    args = ap.parse_args()

    isa_env = common.isa_environment(args.isa)
    env = os.environ | isa_env | {"TOKENIZERS_PARALLELISM": "false"}
    cpu = common._cpu_module().cpu_info()
    print(f"cpu          : {cpu.describe()}")
    print(f"isa          : {common.isa_note(args.isa).replace('re-executed with', 'both runs with')}")
    print(f"threads      : docpipe run's default (os.cpu_count() = {os.cpu_count()})")
    print(f"command      : docpipe -v run {args.input} -o <tmp>.parquet --no-ray "
          f"(make demo: the same under scripts/netns with Ray)")
    build_kernels(env)
    with tempfile.TemporaryDirectory(prefix="demo-dtype-") as tmp:
        runs = [("default dtype", []), ("--dtype bfloat16", ["--dtype", "bfloat16"])]
        results = []
        for label, extra in runs:
            r = run_demo(extra, env, args, Path(tmp), label.strip("-").split()[-1])
            results.append(r)
            busy = f", replica busy {r['busy']:.1f} s" if r["busy"] is not None else ""
            print(f"{label:<17}: run loop {r['wall']:.1f} s (process {r['process']:.1f} s{busy}) | "
                  f"dtype {r['dtype']}")
    default, bf16 = results
    print(f"ratio (bfloat16 run loop / default run loop) = {bf16['wall'] / default['wall']:.2f}x "
          f"(goal >= 3x)")


if __name__ == "__main__":
    main()
