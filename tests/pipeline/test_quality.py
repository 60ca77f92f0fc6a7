"""The faithfulness check flags summaries that are not about their source (the demo's
off-topic outputs) and passes ones that are."""

from pathlib import Path

import pytest

from pipeline.quality import content_words, faithfulness, names

SOTU = sorted((Path(__file__).parents[2] / "examples" / "sotu").glob("*.txt"))


@pytest.fixture(scope="module")
def speech():
    path = next(p for p in SOTU if "1934" in p.name)
    return path.read_text(encoding="utf-8")


def test_off_topic_summary_is_flagged(speech):
    # what `make demo` once wrote for Roosevelt's 1934 address
    off = ("Amara's article explores the challenges of domestic violence, homelessness, and "
           "environmental sustainability, and offers Amara's readers practical advice on "
           "self-care, mindfulness and New Year's resolutions.")
    f = faithfulness(off, speech)
    assert f.off_topic and f.content_share < 0.2, f.describe()


def test_on_topic_summary_passes(speech):
    on = ("President Roosevelt tells Congress that the nation is recovering from the "
          "depression: the government has acted to relieve unemployment, restore banking and "
          "help agriculture and industry, and further recovery and reform must follow.")
    f = faithfulness(on, speech)
    assert not f.off_topic, f.describe()
    assert f.content_share > 0.6


def test_words_and_names():
    assert content_words("The speeches were given") == ["speech", "given"]
    assert names("We met Alice. Then Bob and Carol left Paris.") == ["Alice", "Bob", "Carol", "Paris"]
    empty = faithfulness("", "anything at all")
    assert empty.off_topic and empty.content_share == 0.0
