"""Fixtures shared by the moefy and calibrate tests."""

import pytest

PROSE = [
    "The whale rose from the sea at dawn, and the crew watched in silence as it turned. ",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n",
    "In the year of the great storm the harbour froze, and the ships stayed in port. ",
    "SELECT name, count(*) FROM users WHERE age > 30 GROUP BY name ORDER BY 2 DESC;\n",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny calibration store: each of PROSE (prose, code, SQL) 12 times in its own file."""
    path = tmp_path_factory.mktemp("store")
    for i, text in enumerate(PROSE):
        (path / f"doc{i}.txt").write_text(text * 12)
    return path
