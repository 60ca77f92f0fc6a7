"""`docpipe report`: every plot present, coverage flags a chunk left out of a merge."""

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib")

from jobs.cli import main  # noqa: E402
from pipeline.report import coverage, error_cause, render_html  # noqa: E402
from pipeline.request_log import read_request_logs  # noqa: E402
from tests.jobfiles import tiny_job_text  # noqa: E402

EXAMPLES = Path(__file__).parents[2] / "examples" / "sotu"
SECTIONS = ["throughput", "latency", "kv-cache", "prefix-cache", "merge-trees", "errors",
            "experts"]


def section(page: str, sid: str) -> str:
    match = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert match, f"section {sid} missing"
    return match.group(1)


def test_report_of_a_run_over_examples(tiny_moe_dir, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(EXAMPLES, store)
    (store / "broken.txt").write_bytes(b"\x00binary")
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(main, [
        "run", str(store), "-o", str(out), "--model", str(tiny_moe_dir), "--no-ray", "--quiet",
        "--dtype", "float32", "--chunk-tokens", "1024", "--overlap", "64",
        "--max-summary-tokens", "4", "--report"], catch_exceptions=False)
    assert result.exit_code == 2, result.output  # the broken document is an error row
    log = tmp_path / "_out.parquet.requests.arrow"
    report = tmp_path / "_out.parquet.report.html"
    assert log.exists() and report.exists()
    # what the plots are drawn from: first-token times inside each request's span, and KV
    # samples the replica took while it worked
    requests, replica_stats, wall = read_request_logs([log])
    model_rows = [r for r in requests.to_pylist() if not r["from_store"]]
    assert model_rows
    for r in model_rows:
        assert r["start_s"] <= r["first_token_s"] <= r["finish_s"], r
    samples = replica_stats[0]["kv_timeline"]
    assert samples and all(0.0 <= u <= 1.0 for _, u, *_ in samples)
    assert max(u for _, u, *_ in samples) > 0.0
    assert all(-1.0 <= t <= wall + 1.0 for t, *_ in samples)  # seconds since the run began
    page = report.read_text()
    for sid in SECTIONS:
        body = section(page, sid)
        assert re.search(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', body), sid
    assert "http://" not in page and "https://" not in page  # nothing fetched at view time
    assert page.count('class="tree"') == 3  # one merge tree per ok document
    assert "binary content" in section(page, "errors")
    assert "not covered" not in page  # a real run covers every chunk
    # `docpipe report` again, to a chosen file
    again = CliRunner().invoke(main, ["report", str(out), "-o", str(tmp_path / "r.html")])
    assert again.exit_code == 0 and (tmp_path / "r.html").read_text().count("<section") == 7


def test_coverage_flags_a_chunk_left_out_of_a_merge():
    def chunk(i):
        return dict(index=i, output=f"c{i}", expert_tokens=None)

    row = dict(doc_id="doc", source="s", status="ok", num_chunks=4, chunks=[chunk(i) for i in range(4)],
               merges=[dict(level=1, index=0, sources=[0, 1], pool="p", model="m"),
                       dict(level=1, index=1, sources=[3], pool="p", model="m"),  # 2 left out
                       dict(level=2, index=0, sources=[0, 1, 3], pool="p", model="m")])
    assert coverage(row) == ({0, 1, 3}, [2])
    full = dict(row, merges=[dict(level=1, index=0, sources=[0, 1, 2, 3])])
    assert coverage(full) == ({0, 1, 2, 3}, [])
    assert coverage(dict(row, merges=[], num_chunks=1, chunks=[chunk(0)])) == ({0}, [])
    page = render_html([row, dict(full, doc_id="whole")])
    merge_section = section(page, "merge-trees")
    assert '<tr class="uncovered"><td>doc</td><td>4</td><td>3</td>' in merge_section
    assert "not covered: chunks 2" in merge_section
    assert '<tr class=""><td>whole</td>' in merge_section and "all chunks" in merge_section
    for sid in SECTIONS[:-1]:  # no MoE rows: no experts section, every other plot drawn
        assert "data:image/png;base64," in section(page, sid)
    assert 'id="experts"' not in page


def test_error_causes_group_rows():
    rows = [dict(source="a.txt", error="a.txt: binary content (NUL byte at offset 3), not text"),
            dict(source="b.txt", error="b.txt: binary content (NUL byte at offset 9), not text"),
            dict(source="c", error="poison request: replica 2 died")]
    assert [error_cause(r) for r in rows] == ["binary content", "binary content",
                                              "poison request: replica N died"]


def test_report_of_a_missing_output_is_an_error(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path / "nope.parquet")])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {tmp_path / 'nope.parquet'}: no such results file")


def test_jobs_run_report(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "a.txt").write_text("The sea was calm that night. " * 30)
    job = tmp_path / "job.toml"
    job.write_text(tiny_job_text(store, tmp_path / "out", tiny_model_dir))
    result = CliRunner().invoke(main, ["jobs", "run", str(job), "--quiet", "--report"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "out" / "_report.html").read_text()
    assert all(f'<section id="{sid}">' in page for sid in SECTIONS[:-1])
    assert (tmp_path / "out" / "_requests" / "run-00001.arrow").exists()
    covered = section(page, "merge-trees")
    assert "<td>a.txt</td>" in covered and "all chunks" in covered
