import random
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.chunking import (
    Chunk,
    chunk_text,
    count_tokens,
    get_encoding,
    plan_summary,
)

ROOT = Path(__file__).resolve().parents[2]
ENC = get_encoding()


def check_invariants(doc: str, chunks: list[Chunk], chunk_tokens: int) -> None:
    """Every rule of the chunk plan, on one document."""
    if not doc:
        assert chunks == []
        return
    assert chunks[0].char_start == 0 and chunks[0].token_start == 0
    assert chunks[-1].char_end == len(doc)
    assert chunks[-1].token_end == count_tokens(doc)
    for i, c in enumerate(chunks):
        assert c.index == i
        assert c.text == doc[c.char_start : c.char_end]
        assert c.char_start < c.char_end
        assert c.token_start < c.token_end
        assert len(ENC.encode_ordinary(c.text)) <= chunk_tokens, (i, c)
        assert c.char_start <= c.overlap_char_end <= c.char_end
    assert chunks[0].overlap_char_end == 0 and chunks[0].overlap_tokens == 0
    for prev, c in zip(chunks, chunks[1:], strict=False):
        assert prev.char_start < c.char_start <= prev.char_end < c.char_end  # progress, no gap
        assert prev.token_start <= c.token_start
        assert c.overlap_char_end == prev.char_end  # the shared region is where it says
        shared = doc[c.char_start : c.overlap_char_end]
        assert prev.text.endswith(shared) and c.text.startswith(shared)
        assert (c.overlap_tokens > 0) == (c.overlap_char_end > c.char_start)
    assert "".join(c.new_text for c in chunks) == doc  # non-overlap parts rebuild the doc


WORDS = st.text(alphabet=string.ascii_letters, min_size=1, max_size=12)
SEPARATORS = st.sampled_from([" ", " ", " ", "\n", "\n\n", ". ", "! ", "? ", "\u3002", "\t", ", "])
MULTIBYTE = st.text(
    alphabet=st.sampled_from("éüß中文字日本語한국어😀🎉🚀👩‍👩‍👧\u0301\u200d"), min_size=1, max_size=20
)
NO_SPACE_RUN = st.text(alphabet=string.ascii_letters + string.digits + "_-/é中😀", min_size=20,
                       max_size=400)
ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200)
PIECES = st.one_of(WORDS, SEPARATORS, MULTIBYTE, NO_SPACE_RUN, ANY_TEXT)
DOCS = st.one_of(st.lists(PIECES, max_size=20), st.lists(PIECES, min_size=20, max_size=200)).map(
    "".join
)


@st.composite
def windows(draw):
    chunk_tokens = draw(st.one_of(st.integers(16, 40), st.integers(16, 200)))
    overlap = draw(st.integers(0, (chunk_tokens - 1) // 2))
    return chunk_tokens, overlap


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=DOCS, window=windows())
def test_chunks_cover_document_exactly(doc, window):
    chunk_tokens, overlap = window
    chunks = chunk_text(doc, chunk_tokens, overlap)
    event(f"chunks: {min(len(chunks), 5)}{'+' if len(chunks) >= 5 else ''}")
    check_invariants(doc, chunks, chunk_tokens)


@settings(max_examples=40, deadline=None)
@given(doc=st.text(alphabet=st.sampled_from("a1 \n.中😀\u0301"), max_size=3000),
       window=windows())
def test_chunks_on_dense_small_alphabet(doc, window):
    chunk_tokens, overlap = window
    check_invariants(doc, chunk_text(doc, chunk_tokens, overlap), chunk_tokens)


def test_empty_text_gives_no_chunks():
    assert chunk_text("") == []


def test_short_text_is_one_chunk():
    (c,) = chunk_text("Hello world.", 64, 8)
    assert (c.char_start, c.char_end, c.token_start, c.token_end) == (0, 12, 0, 3)
    assert c.overlap_char_end == 0 and c.overlap_tokens == 0


def test_cuts_snap_to_paragraph_then_sentence():
    sentence = "The whale swam on through the grey water of the sea. "
    paragraph = sentence * 6 + "\n\n"
    doc = paragraph * 12
    chunks = chunk_text(doc, 256, 32)
    check_invariants(doc, chunks, 256)
    assert len(chunks) > 2
    for c in chunks[:-1]:
        assert c.text.endswith(". \n\n") or c.text.endswith(". "), repr(c.text[-20:])
    # a paragraph every ~70 tokens: within the last 15% of a 256 window (38 tokens) there is
    # not always one; where there is, it wins over the sentence ends after it.
    paragraph_cuts = [c for c in chunks[:-1] if c.text.endswith("\n\n")]
    assert paragraph_cuts
    # without paragraphs, the cut lands after a sentence end
    flat = sentence * 80
    for c in chunk_text(flat, 200, 20)[:-1]:
        assert c.text.endswith(". ")


def test_cut_prefers_paragraph_over_later_sentence_end():
    head = "word " * 170 + "end of paragraph.\n\n"
    tail = "More text here. Another sentence. " * 20
    doc = head + tail
    c0 = chunk_text(doc, 200, 0)[0]
    assert c0.text == head  # the paragraph break lies in the last 15% of the window


def test_cut_falls_back_to_token_boundary_without_boundaries():
    rnd = random.Random(1)
    doc = "".join(rnd.choices(string.ascii_letters + string.digits, k=5000))
    chunks = chunk_text(doc, 128, 16)
    check_invariants(doc, chunks, 128)
    assert max(len(ENC.encode_ordinary(c.text)) for c in chunks) >= 120


def test_one_million_char_line_without_boundaries():
    rnd = random.Random(0)
    doc = "".join(rnd.choices(string.ascii_letters + string.digits + "é中😀", k=1_000_000))
    chunks = chunk_text(doc, 2048, 256)
    check_invariants_fast(doc, chunks, 2048)


def check_invariants_fast(doc, chunks, chunk_tokens):
    assert chunks[0].char_start == 0 and chunks[-1].char_end == len(doc)
    for prev, c in zip(chunks, chunks[1:], strict=False):
        assert prev.char_start < c.char_start <= prev.char_end < c.char_end
    assert "".join(c.new_text for c in chunks) == doc
    lengths = [len(t) for t in ENC.encode_ordinary_batch([c.text for c in chunks], num_threads=1)]
    assert max(lengths) <= chunk_tokens


def test_multibyte_characters_split_across_tokens():
    # cl100k splits many CJK characters and emoji over several tokens: cuts must still land
    # on character boundaries and chunk texts must be valid strings of whole characters.
    doc = "😀🎉🚀" * 300 + "中文字日本語" * 300
    chunks = chunk_text(doc, 32, 8)
    check_invariants(doc, chunks, 32)
    for c in chunks:
        c.text.encode("utf-8")  # no lone surrogates or halves


def test_special_token_text_is_plain_text():
    doc = "before <|endoftext|> after " * 50
    chunks = chunk_text(doc, 32, 4)
    check_invariants(doc, chunks, 32)


def test_moby_dick_benchmark_file():
    doc = (ROOT / "benchmarks/data/moby-dick-100k.txt").read_text(encoding="utf-8")
    assert count_tokens(doc) == 100_000
    chunks = chunk_text(doc, 2048, 256)
    check_invariants_fast(doc, chunks, 2048)
    assert chunks[-1].token_end == 100_000
    # prose: every cut but the last snaps to a paragraph, sentence or word boundary
    assert all(c.text[-1].isspace() for c in chunks[:-1])


@pytest.mark.parametrize(
    ("chunk_tokens", "overlap", "match"),
    [
        (15, 0, "chunk_tokens must be >= 16, got 15"),
        (2.5, 0, "chunk_tokens must be an integer"),
        (64, -1, "overlap must be >= 0 and < chunk_tokens/2 \\(32\\), got -1"),
        (64, 32, "overlap must be >= 0 and < chunk_tokens/2 \\(32\\), got 32"),
        (64, "8", "overlap must be an integer"),
    ],
)
def test_bad_arguments_name_the_argument(chunk_tokens, overlap, match):
    with pytest.raises(ValueError, match=match):
        chunk_text("some text", chunk_tokens, overlap)


def test_unknown_encoding_lists_known_ones():
    with pytest.raises(ValueError, match="unknown tiktoken encoding 'nope'; use one of: .*cl100k"):
        get_encoding("nope")


def test_lone_surrogate_is_rejected_with_position():
    with pytest.raises(ValueError, match="not encodable as UTF-8 at char 3"):
        chunk_text("abc\ud800def", 64, 8)


def test_plan_summary_lists_every_chunk():
    doc = "A sentence about whales. " * 200
    chunks = chunk_text(doc, 128, 16)
    plan = plan_summary(chunks, count_tokens(doc))
    lines = plan.splitlines()
    assert lines[0] == f"{len(chunks)} chunks over {count_tokens(doc)} tokens"
    assert len(lines) == len(chunks) + 2
    assert lines[2].split()[:3] == ["0", f"0-{chunks[0].token_end}", f"0-{chunks[0].char_end}"]
    assert all(len(line.split("  ")[-1]) <= 60 for line in lines[2:])
    assert plan_summary([], 0) == "0 chunks over 0 tokens"
