"""No unpickling anywhere in the project; Ray's dashboard stays off; layers import one way."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ["models", "workers", "pipeline", "jobs"]


def _sources():
    for pkg in PACKAGES:
        yield from (ROOT / pkg).rglob("*.py")


def test_no_unpickling_in_project_code():
    pattern = re.compile(r"\bpickle\b|torch\.load\(|cloudpickle|numpy\.load\(.*allow_pickle=True|dill\b")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in _sources()
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_ray_dashboard_is_off():
    source = (ROOT / "workers" / "pool.py").read_text()
    assert "include_dashboard=False" in source and 'dashboard_host="127.0.0.1"' in source


def test_imports_point_one_way():
    forbidden = {"models": ["ray", "workers", "pipeline", "jobs", "click", "pyarrow"],
                 "workers": ["pipeline", "jobs", "click"],
                 "pipeline": ["jobs"]}
    for pkg, banned in forbidden.items():
        for path in (ROOT / pkg).rglob("*.py"):
            if path.name == "cli.py":
                continue  # the CLI may import jobs inside command bodies
            for line in path.read_text().splitlines():
                m = re.match(r"\s*(?:from|import)\s+([a-z_]+)", line)
                assert not (m and m.group(1) in banned), f"{path.relative_to(ROOT)}: {line.strip()}"


def test_import_models_and_workers_without_ray():
    code = "import sys, models, workers.host, workers.pool; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
