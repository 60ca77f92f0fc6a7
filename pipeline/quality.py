"""Is a summary about its source? A cheap faithfulness check that catches off-topic output.

    content share = summary content words found in the source / summary content words
    entity share  = summary names found in the source / summary names

Content words are lowercased alphabetic words of 3+ letters that are not stopwords, compared
after crude suffix stripping ("speeches" and "speech" match); names are capitalized words
that do not start a sentence, compared case-sensitively. A summary is flagged off-topic when
its content share is below `min_content` or, with at least `min_names` names, its entity
share is below `min_entities`. The check reads text only (no model): a hallucinated summary
of a real speech ("Amara's article explores domestic violence, homelessness, ...") shares
few content words and none of its names with the speech.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_SENTENCE_END = re.compile(r"[.!?:;]\s*$")
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from
further had has have having he her here hers herself him himself his how i if in into is it
its itself just me more most my myself no nor not now of off on once only or other our ours
ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves
one two many much may might must shall upon within without among however thus therefore
text summary part document discusses discuss describes describe overall also article
""".split())


def _stem(word: str) -> str:
    for suffix in ("ing", "ies", "es", "ed", "ly", "s"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> list[str]:
    words = [w.lower().strip("'-") for w in _WORD.findall(text)]
    return [_stem(w) for w in words if len(w) >= 3 and w not in STOPWORDS]


def names(text: str) -> list[str]:
    """Capitalized words that do not begin a sentence (a crude named-entity list)."""
    out = []
    prev_end = True
    for m in re.finditer(r"\S+", text):
        token = m.group(0)
        word = _WORD.match(token)
        if word and token[0].isupper() and not prev_end and len(word.group(0)) > 1:
            out.append(re.sub(r"'s$", "", word.group(0)).strip("'-"))
        prev_end = bool(_SENTENCE_END.search(token))
    return [n for n in out if n and n.lower() not in STOPWORDS]


@dataclass(frozen=True, slots=True)
class Faithfulness:
    content_share: float
    entity_share: float | None  # None: the summary names nothing
    num_content_words: int
    num_names: int
    off_topic: bool

    def describe(self) -> str:
        ent = "-" if self.entity_share is None else f"{self.entity_share:.2f}"
        return (f"content {self.content_share:.2f} of {self.num_content_words}, names {ent} of "
                f"{self.num_names}{', OFF-TOPIC' if self.off_topic else ''}")


def faithfulness(summary: str, source: str, min_content: float = 0.6,
                 min_entities: float = 0.5, min_names: int = 2) -> Faithfulness:
    words = content_words(summary)
    vocab = set(content_words(source))
    content = sum(w in vocab for w in words) / len(words) if words else 0.0
    summary_names = names(summary)
    source_names = set(names(source)) | {w.strip("'-") for w in _WORD.findall(source)
                                         if w[:1].isupper()}
    entity = (sum(n in source_names for n in summary_names) / len(summary_names)
              if summary_names else None)
    off = content < min_content or (
        entity is not None and len(summary_names) >= min_names and entity < min_entities)
    return Faithfulness(content, entity, len(words), len(summary_names), off)
