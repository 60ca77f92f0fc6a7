"""Prompt templates. Their text is part of the config fingerprint (`PROMPT_VERSION`)."""

from __future__ import annotations

import hashlib
import re

# The instruction comes after the text it is about: small models follow an instruction
# they read last and lose one that 1-2K tokens of text pushed back (benchmarks/quality.py,
# SmolLM2 on 10 ACLSum val papers: ROUGE-L single-pass 0.140 -> 0.154, map-reduce 0.130 ->
# 0.134, off-topic summaries 8 -> 5 and 9 -> 8 of 10, against the instruction-first layout).
DEFAULT_TASK = "Summarize the text above in a few sentences."
DEFAULT_REDUCE_TASK = (
    "The parts above are summaries of consecutive parts of one document. "
    "Combine them into one coherent summary of the whole document."
)
CONTEXT_TASK = "Summarize the text above in one sentence."

MAP = "Text:\n{text}\n\n{task}"
# overlap-summary: every prompt about a chunk begins with the chunk's text, so a chunk's map
# prompt and the next chunk's context prompt share their prefix (the prefix cache serves it)
TEXT_FIRST = "Text:\n{text}\n\n{task}"
MAP_WITH_CONTEXT = "Text:\n{text}\n\nWhat came before this text: {context}\n\n{task}"
REFINE = (
    "Here is a summary of a document so far:\n{summary}\n\n"
    "Here is the next part of the document:\n{text}\n\n"
    "Update the summary so that it also covers this part. {task}"
)
REDUCE = "{pieces}\n\n{task}"
PIECE = "Part {n}: {text}"


# A merge answer's copies of the "Part N:" labels of its prompt, at the start of a line: small
# models imitate the layout (SmolLM2 began 39 of 40 merged ACLSum summaries with "Part 1:").
# They are scaffolding, not content, so merged outputs lose them (strip_piece_labels).
_PIECE_LABEL = re.compile(r"^[ \t]*Part \d+:[ \t]*\n?", re.MULTILINE)

PROMPT_VERSION = hashlib.sha256(
    "\x00".join([DEFAULT_TASK, DEFAULT_REDUCE_TASK, CONTEXT_TASK, MAP, TEXT_FIRST,
                 MAP_WITH_CONTEXT, REFINE, REDUCE, PIECE,
                 _PIECE_LABEL.pattern]).encode()
).hexdigest()[:12]


def as_chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def map_prompt(text: str, task: str | None) -> str:
    return MAP.format(task=task or DEFAULT_TASK, text=text)


def map_with_context_prompt(text: str, context: str, task: str | None) -> str:
    return MAP_WITH_CONTEXT.format(task=task or DEFAULT_TASK, context=context.strip(), text=text)


def text_first_prompt(text: str, task: str | None) -> str:
    return TEXT_FIRST.format(task=task or DEFAULT_TASK, text=text)


def context_prompt(text: str) -> str:
    return TEXT_FIRST.format(task=CONTEXT_TASK, text=text)


def refine_prompt(summary: str, text: str, task: str | None) -> str:
    return REFINE.format(summary=summary.strip(), text=text, task=task or DEFAULT_TASK)


def piece_text(n: int, text: str) -> str:
    """One piece as it appears in a merge prompt, with the separator that follows it."""
    return PIECE.format(n=n, text=text.strip()) + "\n\n"


def strip_piece_labels(text: str) -> str:
    """A merge answer without the "Part N:" labels it copied from its prompt's pieces."""
    return _PIECE_LABEL.sub("", text).strip()


def reduce_prompt(pieces: list[str], task: str | None) -> str:
    joined = "".join(piece_text(i + 1, p) for i, p in enumerate(pieces)).rstrip("\n")
    return REDUCE.format(task=task or DEFAULT_REDUCE_TASK, pieces=joined)
