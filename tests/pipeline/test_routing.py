"""Routing rules are data: parsed into conditions, never evaluated; mistakes are one
`Error:` line naming the rule and the fix, before any work."""

import json

import pytest
from click.testing import CliRunner

from jobs.cli import main
from jobs.spec import JobSpecError, parse_job
from pipeline.routing import RouteError, RouteTable, parse_rule, request_stage

POOLS = ["moe", "swa"]


def test_rules_match_in_order_first_wins_default_is_the_first_pool():
    table = RouteTable(["tokens >= 32000 -> swa", "stage == reduce -> moe",
                        'column:lang == "code" and tokens < 100 -> swa'], POOLS)
    assert table.pool_for(40000, {}, "map") == "swa"
    assert table.pool_for(40000, {}, "reduce") == "swa"  # first match wins
    assert table.pool_for(500, {}, "reduce") == "moe"
    assert table.pool_for(500, {}, "map") == "moe"  # no rule: the first pool
    assert table.pool_for(50, {"lang": "code"}, "map") == "swa"
    assert table.pool_for(50, {"lang": "prose"}, "map") == "moe"
    assert table.pool_for(50, {}, "map") == "moe"  # a row without the column never matches
    assert table.columns == ["lang"]
    assert table.plan(500, {}) == {"map": "moe", "context": "moe", "refine": "moe", "reduce": "moe"}


def test_values_are_typed_and_canonical():
    rule = parse_rule("column:score>=0.5 and column:ok == true and stage != map ->swa", POOLS)
    assert rule.text == "column:score >= 0.5 and column:ok == true and stage != map -> swa"
    assert rule.matches(0, {"score": 0.7, "ok": True}, "reduce")
    assert not rule.matches(0, {"score": "0.7", "ok": True}, "reduce")  # text is not a number
    assert not rule.matches(0, {"score": 0.7, "ok": True}, "map")
    assert request_stage("ctx") == "context" and request_stage("reduce12") == "reduce"


def test_a_rule_is_never_code():
    with pytest.raises(RouteError, match="cannot read condition"):
        parse_rule("__import__('os').system('false') -> moe", POOLS)


@pytest.mark.parametrize("rule, fragment", [
    ("tokens >= 32000 -> dense", "unknown pool 'dense'; the pools are moe, swa"),
    ("tokens >= lots -> swa", "give a whole number of tokens"),
    ("stage == summarize -> swa", "unknown stage 'summarize'; stages are map, context, refine, reduce"),
    ("stage > map -> swa", "stage takes == or !="),
    ("column:lang == code -> swa", "neither a number nor quoted text"),
    ('column:lang > "a" -> swa', "compares numbers"),
    ("tokens >= 10 swa", "write CONDITION -> POOL"),
    ("tokens >= 10 or stage == map -> swa", "join conditions with 'and'"),
])
def test_bad_rules_name_the_fix(rule, fragment):
    with pytest.raises(RouteError) as info:
        parse_rule(rule, POOLS)
    assert fragment in str(info.value) and repr(rule) in str(info.value)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("args, fragment", [
    (["--pool", "a=m", "--route", "tokens >= 5 -> b"], "unknown pool 'b'"),
    (["--pool", "a=m", "--route", "tokens >= five -> a"], "give a whole number of tokens"),
    (["--pool", "a=m", "--pool", "a=n"], "pool 'a': duplicate pool name"),
    (["--pool", "a"], "--pool 'a': write NAME=MODEL"),
    (["--pool", "a=m,replicas=2"], "unknown key 'replicas'"),
    (["--pool", "a=m,workers=two"], "workers='two' should be a int"),
    (["--pool", "a=m,workers=0"], "pool 'a': workers=0: must be at least 1"),
    (["--pool", "9a=m"], "give each pool a name"),
])
def test_cli_pool_and_route_errors_are_one_line(tmp_path, args, fragment):
    result = invoke("run", tmp_path, "-o", tmp_path / "o.parquet", "--no-ray", *args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert fragment in result.output


def test_cli_bad_column_is_an_error_before_any_work(tmp_path):
    store = tmp_path / "docs.jsonl"
    store.write_text(json.dumps({"id": "a", "text": "hello", "lang": "en"}) + "\n")
    result = invoke("run", store, "-o", tmp_path / "o.parquet", "--no-ray", "--model", "no-such",
                    "--pool", "a=no-such", "--route", 'column:language == "en" -> a')
    assert result.exit_code == 1
    assert "routing rule names column 'language'" in result.output and "lang" in result.output
    assert not (tmp_path / "o.parquet").exists()


BASE = {"input": {"path": "d"}, "output": {"path": "o"}}


@pytest.mark.parametrize("extra, fragment", [
    ({"pools": []}, "pools = [] is empty"),
    ({"pools": [{"name": "a", "model": "m"}, {"name": "a", "model": "n"}]},
     "pool 'a': duplicate pool name"),
    ({"pools": [{"model": "m"}]}, "pools[0] has no name"),
    ({"pools": [{"name": "a", "modle": "m"}]}, "unknown key modle in pools[0] ('a')"),
    ({"pools": [{"name": "a", "workers": "2"}]}, "pools[0] ('a').workers = '2' should be an integer"),
    ({"pools": [{"name": "a"}], "routes": ["tokens > 1 -> b"]}, "unknown pool 'b'"),
    ({"routes": "tokens > 1 -> default"}, "routes must be a list of strings"),
])
def test_job_file_pool_and_route_errors(tmp_path, extra, fragment):
    with pytest.raises(JobSpecError) as info:
        parse_job({**BASE, **extra}, tmp_path / "j.toml")
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'j.toml'}: ") and "\n" not in msg and fragment in msg, msg


def test_job_file_pools_and_routes(tmp_path):
    spec = parse_job({"routes": ["stage == reduce -> b"], **BASE, "model": {"name": "m"},
                      "pools": [{"name": "a"}, {"name": "b", "model": "n", "workers": 2}]},
                     tmp_path / "j.toml")
    a, b = spec.run.pool_configs()
    assert (a.model, b.model, b.workers) == ("m", "n", 2) and spec.run.routes == ["stage == reduce -> b"]
