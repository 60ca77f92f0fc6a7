"""Strategies: a small state machine per document that emits model requests.

    map-reduce       map(chunk i) for all i in parallel            -> hierarchical reduce
    overlap-summary  ctx(chunk i-1) for i >= 1 in parallel (a short "what came before");
                     map(chunk i | ctx) as each context arrives     -> hierarchical reduce
    refine           s0 = map(chunk 0); s_i = refine(s_{i-1}, chunk i): sequential within a
                     document, many documents in flight; the last s_i is the summary

`start()` returns the first requests; `on_output(request, text)` returns the next ones;
`done` says when `summary` is final. Request ids are deterministic from (doc key, stage,
index), so a persisted output can be matched to its request after a crash.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline import prompts
from pipeline.chunking import Chunk
from pipeline.merge import MAX_MERGE_LEVELS, MergeStalled, Piece, group_pieces, merged_sources


@dataclass(slots=True)
class Request:
    request_id: str
    stage: str  # "map", "ctx", "refine", "reduce1", "reduce2", ...
    index: int  # chunk index, or group index within a reduce level
    prompt: str  # the user message; the chat template is applied by the runner
    max_tokens: int


@dataclass(slots=True)
class MergeBudget:
    """How big a merge prompt may be, in model tokens, and how to count a text's tokens."""

    budget_tokens: int
    overhead_tokens: int
    count_tokens: Callable[[str], int]


class DocumentStrategy:
    name = ""

    def __init__(self, doc_key: str, chunks: list[Chunk], task: str | None,
                 reduce_task: str | None, max_summary_tokens: int, merge: MergeBudget,
                 context_summary_tokens: int = 48) -> None:
        self.doc_key = doc_key
        self.chunks = chunks
        self.task = task
        self.reduce_task = reduce_task
        self.max_tokens = max_summary_tokens
        self.context_tokens = context_summary_tokens
        self.merge = merge
        self.chunk_outputs: list[str | None] = [None] * len(chunks)
        self.summary: str | None = None
        self.merge_levels = 0
        self.merge_provenance: list[list[list[int]]] = []  # per level: sources of each merged piece
        self._pieces: list[Piece] = []
        self._level_outputs: dict[int, str] = {}
        self._level_groups: list[list[int]] = []
        self._level_size: tuple[int, int] | None = None  # (pieces, tokens) entering the level

    @property
    def done(self) -> bool:
        return self.summary is not None

    def request(self, stage: str, index: int, prompt: str, max_tokens: int | None = None) -> Request:
        return Request(f"{self.doc_key}/{stage}/{index}", stage, index, prompt,
                       max_tokens or self.max_tokens)

    def start(self) -> list[Request]:
        raise NotImplementedError

    def on_output(self, req: Request, text: str) -> list[Request]:
        if req.stage.startswith("reduce"):
            return self._on_reduce(req, text)
        return self._on_chunk_stage(req, text)

    def _on_chunk_stage(self, req: Request, text: str) -> list[Request]:
        raise NotImplementedError

    # -- hierarchical reduce ----------------------------------------------------------------
    def _begin_reduce(self, pieces: list[Piece]) -> list[Request]:
        # Cost of a piece inside a merge prompt: its label, text and separator, counted with
        # the largest label number (labels restart per group, so this is an upper bound).
        for p in pieces:
            p.num_tokens = self.merge.count_tokens(prompts.piece_text(len(pieces), p.text))
        if len(pieces) == 1:
            self.summary = pieces[0].text
            return []
        # Each level must shrink the piece count or their tokens; one that does neither would
        # repeat forever (pieces too big to pair, answers as long as their inputs).
        size = (len(pieces), sum(p.num_tokens for p in pieces))
        if self._level_size is not None and size[0] >= self._level_size[0] \
                and size[1] >= self._level_size[1]:
            raise MergeStalled(
                f"the merge stopped shrinking at level {self.merge_levels}: {size[0]} pieces of "
                f"{size[1]} tokens in all, none of which fit two to a merge prompt of "
                f"{self.merge.budget_tokens} tokens; lower max_summary_tokens")
        if self.merge_levels >= MAX_MERGE_LEVELS:
            raise MergeStalled(f"the merge did not finish in {MAX_MERGE_LEVELS} levels "
                               f"({size[0]} pieces left); lower max_summary_tokens")
        self._level_size = size
        self.merge_levels += 1
        self._pieces = pieces
        self._level_outputs = {}
        self._level_groups = group_pieces(pieces, self.merge.overhead_tokens, self.merge.budget_tokens)
        self.merge_provenance.append([merged_sources(pieces, g) for g in self._level_groups])
        stage = f"reduce{self.merge_levels}"
        return [
            self.request(stage, g, prompts.reduce_prompt([pieces[j].text for j in group], self.reduce_task))
            for g, group in enumerate(self._level_groups)
        ]

    def _on_reduce(self, req: Request, text: str) -> list[Request]:
        self._level_outputs[req.index] = prompts.strip_piece_labels(text)
        if len(self._level_outputs) < len(self._level_groups):
            return []
        nxt = [
            Piece(self._level_outputs[g], merged_sources(self._pieces, group))
            for g, group in enumerate(self._level_groups)
        ]
        return self._begin_reduce(nxt)

    def _map_done(self, index: int, text: str) -> list[Request]:
        """Record a chunk's output; once every chunk has one, start the merge."""
        self.chunk_outputs[index] = text
        if any(o is None for o in self.chunk_outputs):
            return []
        return self._begin_reduce([Piece(out, [i]) for i, out in enumerate(self.chunk_outputs)])


class MapReduce(DocumentStrategy):
    name = "map-reduce"

    def start(self) -> list[Request]:
        return [self.request("map", c.index, prompts.map_prompt(c.text, self.task)) for c in self.chunks]

    def _on_chunk_stage(self, req: Request, text: str) -> list[Request]:
        return self._map_done(req.index, text)


class OverlapSummary(DocumentStrategy):
    """Each chunk comes with a short summary of the text before it ("前文摘要"). Its prompts
    begin with the chunk text, so map(i) and ctx(i + 1) share a cached prefix."""

    name = "overlap-summary"

    def start(self) -> list[Request]:
        first = self.chunks[0]
        reqs = [self.request("map", 0, prompts.text_first_prompt(first.text, self.task))]
        for c in self.chunks[1:]:
            previous = self.chunks[c.index - 1]
            reqs.append(self.request("ctx", c.index, prompts.context_prompt(previous.text),
                                     self.context_tokens))
        return reqs

    def _on_chunk_stage(self, req: Request, text: str) -> list[Request]:
        if req.stage == "ctx":
            c = self.chunks[req.index]
            return [self.request("map", c.index, prompts.map_with_context_prompt(c.text, text, self.task))]
        return self._map_done(req.index, text)


class Refine(DocumentStrategy):
    name = "refine"

    def start(self) -> list[Request]:
        return [self.request("map", 0, prompts.map_prompt(self.chunks[0].text, self.task))]

    def _on_chunk_stage(self, req: Request, text: str) -> list[Request]:
        self.chunk_outputs[req.index] = text
        nxt = req.index + 1
        if nxt == len(self.chunks):
            self.summary = text
            return []
        c = self.chunks[nxt]
        return [self.request("refine", nxt, prompts.refine_prompt(text, c.text, self.task))]


STRATEGY_CLASSES: dict[str, type[DocumentStrategy]] = {
    cls.name: cls for cls in (MapReduce, OverlapSummary, Refine)
}
