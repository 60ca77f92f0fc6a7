"""Imports point one way: models <- workers <- pipeline <- jobs. No module of a layer imports
a higher layer, not even inside a function."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LAYERS = ["models", "workers", "pipeline", "jobs"]


def imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_no_layer_imports_a_higher_one(layer):
    higher = set(LAYERS[LAYERS.index(layer) + 1:])
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files
    bad = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & higher) for p in files}
    assert not {k: v for k, v in bad.items() if v}


def test_the_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from jobs.spec import load_job\n    import pipeline.cli\n")
    assert imported_packages(f) == {"jobs", "pipeline"}
