"""Job files are validated on load: every mistake names the key and the fix."""

import pytest

from jobs.spec import JobSpecError, load_job

GOOD = """
[input]
path = "docs"
[output]
path = "out"
[strategy]
name = "refine"
max_summary_tokens = 64
[resources]
workers = 2
restart_timeout_s = 120
[schedule]
cron = "*/5 * * * *"
"""


def write(tmp_path, text):
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def error(tmp_path, text) -> str:
    path = write(tmp_path, text)
    with pytest.raises(JobSpecError) as info:
        load_job(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    return msg[len(str(path)) + 2:]


def test_good_job(tmp_path):
    spec = load_job(write(tmp_path, GOOD))
    assert spec.input_path == (tmp_path / "docs").resolve()
    assert spec.output_dir == (tmp_path / "out").resolve()
    assert spec.run.strategy == "refine" and spec.run.max_summary_tokens == 64
    assert spec.run.workers == 2 and spec.run.restart_timeout_s == 120 and spec.cron == "*/5 * * * *" and spec.name == "job"


@pytest.mark.parametrize("text, expected", [
    ("[input]\npath='d'\n[output]\npath='o'\n[strategy]\nnmae='x'\n",
     "unknown key strategy.nmae; valid keys in [strategy]: name, task, reduce_task, "
     "max_summary_tokens, context_summary_tokens, temperature, repetition_penalty, penalize_prompt, seed"),
    ("[input]\npath='d'\n[output]\npath='o'\n[extras]\na=1\n",
     "unknown section [extras]; valid sections: job, input, output, model, chunking, "
     "strategy, resources, engine, schedule (and [[pools]], routes)"),
    ("[input]\npath='d'\n[output]\npath='o'\n[chunking]\nchunk_tokens='big'\n",
     "chunking.chunk_tokens = 'big' should be an integer"),
    ("[input]\npath='d'\n[output]\npath='o'\n[resources]\nuse_ray=1\n",
     "resources.use_ray = 1 should be true or false"),
    ("[input]\npath='d'\n", "missing output.path; add it under [output]"),
    ("[input]\npath='d'\n[output]\npath='o'\n[chunking]\noverlap=4000\n",
     "chunking.overlap = 4000: must be >= 0 and less than half of chunk_tokens (1024)"),
    ("[input]\npath='d'\n[output]\npath='o'\n[strategy]\nname='magic'\n",
     "strategy.name = 'magic': use one of auto, map-reduce, overlap-summary, refine"),
    ("[input]\npath='d'\n[output]\npath='o'\n[schedule]\ncron='every day'\n",
     "schedule.cron = 'every day' is not a valid cron expression (five fields: minute hour day month weekday)"),
    ("[input]\npath='d'\n[output]\npath='o'\n[schedule]\nmissed='all'\n",
     "schedule.missed = 'all'; use skip or run-once"),
    ("[input]\npath='d'\n[output]\npath='o'\n[schedule]\ntimezone='Europe/Pariss'\n",
     "schedule.timezone = 'Europe/Pariss' is not a known time zone; use an IANA name such as "
     "\"UTC\", \"Europe/Paris\" or \"America/New_York\" (leave it out for UTC)"),
    ("[input]\npath='d'\n[output]\npath='o'\n[resources]\nrestart_timeout_s=0\n",
     "resources.restart_timeout_s = 0: must be > 0 (seconds)"),
    ("[input\npath='d'\n", None),
])
def test_bad_job_files(tmp_path, text, expected):
    msg = error(tmp_path, text)
    if expected is None:
        assert "not valid TOML" in msg
    else:
        assert msg == expected


def test_job_files_are_data(tmp_path):
    # Nothing is evaluated: a string that looks like code stays a string.
    spec = load_job(write(tmp_path, GOOD.replace('name = "refine"', 'name = "refine"\ntask = "__import__(\'os\').system(\'false\')"')))
    assert spec.run.task == "__import__('os').system('false')"


def test_the_example_job_files_load():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[2] / "examples" / "jobs").glob("*.toml")):
        spec = load_job(path)
        assert spec.input_path.is_dir(), path
    pools = load_job(Path(__file__).parents[2] / "examples" / "jobs" / "pools.toml").run
    assert [p.name for p in pools.pool_configs()] == ["small", "qwen"] and len(pools.routes) == 2
