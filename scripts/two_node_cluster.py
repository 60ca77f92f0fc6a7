"""Start a real two-node Ray cluster on this machine, run `docpipe run --address` on it, and
tear down only the processes this script started.

    scripts/netns .venv/bin/python scripts/two_node_cluster.py STORE OUTPUT [--model M] [--port 6390]

Head: `ray start --head` with 1 CPU and resource `head_node`; second node: `ray start
--address` with 1 CPU and resource `second_node`. `docpipe run --workers 2` places one replica
on each. Prints the cluster's nodes and exits non-zero if anything fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def ray_pids() -> set[int]:
    import psutil

    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ray" in cmd and ("raylet" in cmd or "gcs_server" in cmd or "ray::" in cmd
                             or "default_worker" in cmd or "dashboard" in cmd or "log_monitor" in cmd
                             or "monitor.py" in cmd or "runtime_env" in cmd or "ray/_private" in cmd
                             or "ray.util.client.server" in cmd):  # the head's client proxy
            pids.add(p.info["pid"])
    return pids


def kill(pids: set[int]) -> None:
    import psutil

    procs = [psutil.Process(p) for p in pids if psutil.pid_exists(p)]
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("output")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--port", type=int, default=6390)
    args, extra = ap.parse_known_args()  # anything else goes to `docpipe run`
    extra = [a for a in extra if a != "--"]
    root = Path(tempfile.mkdtemp(prefix="docpipe-cluster-"))
    # A fresh cluster: no Ray settings inherited from a parent process (a test session's Ray
    # exports its auth mode and addresses); the head writes its own token under this HOME.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(root), RAY_USAGE_STATS_ENABLED="0")
    before = ray_pids()
    address = f"127.0.0.1:{args.port}"
    ray = str(BIN / "ray")
    def start(cmd: list[str]) -> None:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    try:
        start([ray, "start", "--head", f"--port={args.port}", "--num-cpus=1",
                        "--resources", json.dumps({"head_node": 1}), f"--temp-dir={root / 'ray'}",
                        "--include-dashboard=false", "--disable-usage-stats"])
        start([ray, "start", f"--address={address}", "--num-cpus=1",
               "--resources", json.dumps({"second_node": 1})])
        check = (f"import ray, json; ray.init(address='{address}', logging_level='ERROR'); "
                 "print(json.dumps([sorted(k for k in n['Resources'] if k.endswith('_node')) "
                 "for n in ray.nodes() if n['Alive']]))")
        for _ in range(30):
            out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
            nodes = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []
            if len(nodes) == 2:
                break
            time.sleep(1)
        print(f"cluster nodes: {nodes}")
        if len(nodes) != 2:
            print("the second node did not join", file=sys.stderr)
            return 1
        t0 = time.perf_counter()
        run = subprocess.run([str(BIN / "docpipe"), "run", args.store, "-o", args.output,
                              "--address", address, "--workers", "2", "--model", args.model, *extra],
                             env=env, text=True, capture_output=True)
        print(run.stdout)
        print(run.stderr, file=sys.stderr)
        print(f"docpipe run --address {address} --workers 2: exit {run.returncode} "
              f"in {time.perf_counter() - t0:.1f} s")
        return run.returncode
    finally:
        kill(ray_pids() - before)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
