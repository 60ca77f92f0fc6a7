r"""Hierarchical merge: group pieces so every merge prompt fits the model's context.

    level 0:  p0 p1 p2 p3 p4 p5 p6        (chunk outputs, sources {i})
               \___/  \____/ \___/
    level 1:    m0      m1     m2         (each merge prompt <= budget; sources = union)
                 \______/      |
    level 2:        m0'        m2 ...     until one piece remains

A piece too large to share a prompt with any other still goes alone into a group (it is
shortened by the prompt fitter), and every level at least halves the piece count whenever
two pieces fit together. The run checks at start that two pieces of `max_summary_tokens` fit
in one merge prompt (`pipeline.runner.largest_mergeable_summary`); a level that shrinks
neither the piece count nor their tokens, or a merge deeper than MAX_MERGE_LEVELS, raises
MergeStalled, which makes the document an error row, so a merge always ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Every level at least halves the count when pieces pair, so 2**40 chunks would need 40.
MAX_MERGE_LEVELS = 40


class MergeStalled(RuntimeError):
    """A document's merge would not end; the document becomes an error row."""


@dataclass(slots=True)
class Piece:
    text: str
    sources: list[int] = field(default_factory=list)  # chunk indices this piece summarizes
    num_tokens: int = 0  # model tokens of this piece as it appears in a merge prompt


def group_pieces(pieces: list[Piece], overhead_tokens: int, budget_tokens: int) -> list[list[int]]:
    """Consecutive groups of piece indices; each group's tokens + overhead <= budget when it
    has more than one piece. Every group has >= 2 pieces unless a piece cannot share."""
    assert budget_tokens > overhead_tokens, "merge budget smaller than the prompt overhead"
    groups: list[list[int]] = []
    current: list[int] = []
    used = overhead_tokens
    for i, piece in enumerate(pieces):
        cost = piece.num_tokens
        if current and used + cost > budget_tokens:
            groups.append(current)
            current, used = [], overhead_tokens
        current.append(i)
        used += cost
    if current:
        groups.append(current)
    # A trailing singleton would survive to the next level unchanged: fold it into the
    # previous group if that still fits, so each level shrinks the count.
    if len(groups) > 1 and len(groups[-1]) == 1:
        prev = groups[-2]
        total = overhead_tokens + sum(pieces[j].num_tokens for j in prev + groups[-1])
        if total <= budget_tokens:
            groups[-2] = prev + groups.pop()
    return groups


def merged_sources(pieces: list[Piece], group: list[int]) -> list[int]:
    return sorted({s for j in group for s in pieces[j].sources})
