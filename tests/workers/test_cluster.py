"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`),
with `docpipe run --address` on it, and the pipeline over local Ray actors."""

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.output import read_results

pytestmark = pytest.mark.ray
ROOT = Path(__file__).parents[2]


def _store(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for i in range(4):
        (store / f"d{i}.txt").write_text(f"Report {i}. " + "The crew mended the sails. " * (30 + 10 * i))
    return store


def test_docpipe_run_on_local_ray_with_two_workers(ray_session, tiny_model_dir, tmp_path):
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(main, [
        "run", str(_store(tmp_path)), "-o", str(out), "--model", str(tiny_model_dir),
        "--dtype", "float32", "--workers", "2", "--chunk-tokens", "128", "--overlap", "16",
        "--max-summary-tokens", "6"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = read_results(out)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert "replica 0" in result.output and "replica 1" in result.output


def test_two_node_cluster(tiny_model_dir, tmp_path):
    out = tmp_path / "out.parquet"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "two_node_cluster.py"), str(_store(tmp_path)), str(out),
         "--model", str(tiny_model_dir), "--port", "6391", "--",
         "--dtype", "float32", "--chunk-tokens", "128", "--overlap", "16", "--max-summary-tokens", "6"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "['head_node']" in proc.stdout and "['second_node']" in proc.stdout
    rows = read_results(out)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
