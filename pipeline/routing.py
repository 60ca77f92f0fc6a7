"""Routing rules: which model pool serves each request. Rules are data: parsed, never evaluated.

    RULE  := COND ("and" COND)* "->" POOL
    COND  := "tokens" OP INTEGER                 the document's tiktoken tokens
           | "stage" ("==" | "!=") STAGE          map, context, refine, reduce
           | "column:" NAME OP VALUE              a metadata column of the store's row
    OP    := == | != | >= | <= | > | <
    VALUE := "text" | 'text' | NUMBER | true | false

    tokens >= 32000 -> swa
    stage == reduce -> moe
    column:lang == "code" and tokens < 8000 -> coder

Rules are tried in order for every request; the first that matches names the pool, and a
request no rule matches goes to the first pool. A row without the column never matches a
column condition. All of a document's conditions are known when it is chunked, so its
pool for each stage is fixed then (`RouteTable.plan`).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

STAGES = ("map", "context", "refine", "reduce")
_OPS = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le,
        ">": operator.gt, "<": operator.lt}
_COND = re.compile(
    r"""\s*(?P<subject>tokens|stage|column:(?P<column>[A-Za-z_][\w.-]*))\s*
        (?P<op>==|!=|>=|<=|>|<)\s*
        (?P<value>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s"']+)\s*""", re.X)
_AND = re.compile(r"and\s+")
_NUMBER = re.compile(r"[+-]?(\d[\d_]*)(\.\d+)?([eE][+-]?\d+)?")
EXAMPLE = 'tokens >= 32000 -> POOL, stage == reduce -> POOL or column:lang == "code" -> POOL'


class RouteError(ValueError):
    """A rule cannot be parsed or names an unknown pool, stage or column."""


def request_stage(stage: str) -> str:
    """The rule stage of a strategy request stage ("ctx" -> context, "reduce3" -> reduce)."""
    if stage == "ctx":
        return "context"
    if stage.startswith("reduce"):
        return "reduce"
    return stage


@dataclass(frozen=True, slots=True)
class Condition:
    subject: str  # "tokens", "stage" or "column"
    op: str
    value: Any
    column: str | None = None

    def matches(self, tokens: int, metadata: Mapping[str, Any], stage: str) -> bool:
        if self.subject == "tokens":
            return _OPS[self.op](tokens, self.value)
        if self.subject == "stage":
            return _OPS[self.op](stage, self.value)
        if self.column not in metadata:
            return False
        have = metadata[self.column]
        if self.op in ("==", "!="):
            return _OPS[self.op](have, self.value)
        if isinstance(have, bool) or not isinstance(have, (int, float)):
            return False  # an ordering against a non-number never matches
        return _OPS[self.op](have, self.value)

    @property
    def text(self) -> str:
        subject = f"column:{self.column}" if self.subject == "column" else self.subject
        value = self.value
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, str) and self.subject == "column":
            value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{subject} {self.op} {value}"


@dataclass(frozen=True, slots=True)
class Rule:
    conditions: tuple[Condition, ...]
    pool: str

    def matches(self, tokens: int, metadata: Mapping[str, Any], stage: str) -> bool:
        return all(c.matches(tokens, metadata, stage) for c in self.conditions)

    @property
    def text(self) -> str:
        """The rule in canonical form (the fingerprint hashes it)."""
        return " and ".join(c.text for c in self.conditions) + f" -> {self.pool}"


def _value(rule: str, subject: str, op: str, raw: str) -> Any:
    where = f"route {rule!r}"
    if subject == "tokens":
        if not re.fullmatch(r"\d[\d_]*", raw):
            raise RouteError(f"{where}: tokens {op} {raw}: give a whole number of tokens, "
                             f"e.g. tokens >= 32000")
        return int(raw)
    if subject == "stage":
        if op not in ("==", "!="):
            raise RouteError(f"{where}: stage takes == or !=, not {op}")
        if raw not in STAGES:
            raise RouteError(f"{where}: unknown stage {raw!r}; stages are {', '.join(STAGES)}")
        return raw
    if raw[0] in "\"'":
        value = re.sub(r"\\(.)", r"\1", raw[1:-1])
        if op not in ("==", "!="):
            raise RouteError(f"{where}: {op} compares numbers; {raw} is text (use == or !=)")
        return value
    if raw in ("true", "false"):
        return raw == "true"
    m = _NUMBER.fullmatch(raw)
    if m is None:
        raise RouteError(f"{where}: {raw} is neither a number nor quoted text; quote text "
                         f"values, e.g. column:lang == \"code\"")
    return float(raw) if (m.group(2) or m.group(3)) else int(raw)


def parse_rule(text: str, pool_names: Sequence[str]) -> Rule:
    if not isinstance(text, str):
        raise RouteError(f"route {text!r}: a rule is a string such as {EXAMPLE}")
    head, arrow, pool = text.rpartition("->")
    pool = pool.strip()
    if not arrow or not head.strip():
        raise RouteError(f"route {text!r}: write CONDITION -> POOL, e.g. {EXAMPLE}")
    if pool not in pool_names:
        raise RouteError(f"route {text!r}: unknown pool {pool!r}; the pools are "
                         f"{', '.join(pool_names)}")
    conditions = []
    pos = 0
    while True:
        m = _COND.match(head, pos)
        if m is None:
            rest = head[pos:].strip()
            raise RouteError(f"route {text!r}: cannot read condition {rest!r}; conditions are "
                             f"tokens OP N, stage == STAGE, column:NAME OP VALUE")
        conditions.append(Condition(
            "column" if m["column"] else m["subject"], m["op"],
            _value(text, m["subject"].split(":")[0], m["op"], m["value"]), m["column"]))
        pos = m.end()
        if pos == len(head):
            break
        m = _AND.match(head, pos)
        if m is None:
            raise RouteError(f"route {text!r}: join conditions with 'and'; cannot read "
                             f"{head[pos:].strip()!r}")
        pos = m.end()
    return Rule(tuple(conditions), pool)


def parse_routes(rules: Sequence[str] | None, pool_names: Sequence[str]) -> list[Rule]:
    return [parse_rule(r, pool_names) for r in rules or []]


class RouteTable:
    """Rules in order and the default pool (the first)."""

    def __init__(self, rules: Sequence[str] | None, pool_names: Sequence[str]) -> None:
        assert pool_names, "a run has at least one pool"
        self.rules = parse_routes(rules, pool_names)
        self.pool_names = list(pool_names)
        self.default = pool_names[0]

    @property
    def columns(self) -> list[str]:
        """Metadata columns the rules read (the store must have them)."""
        out: list[str] = []
        for r in self.rules:
            out += [c.column for c in r.conditions if c.column and c.column not in out]
        return out

    def pool_for(self, tokens: int, metadata: Mapping[str, Any], stage: str) -> str:
        for rule in self.rules:
            if rule.matches(tokens, metadata, stage):
                return rule.pool
        return self.default

    def plan(self, tokens: int, metadata: Mapping[str, Any]) -> dict[str, str]:
        """Rule stage -> pool for one document."""
        return {s: self.pool_for(tokens, metadata, s) for s in STAGES}

    def pools_for_stage(self, stage: str) -> list[str]:
        """Pools that may serve `stage` for some document (rules that cannot match the stage
        are left out; the default stays unless an earlier rule takes every such request)."""
        out: list[str] = []
        for rule in self.rules:
            stage_conds = [c for c in rule.conditions if c.subject == "stage"]
            if not all(c.matches(0, {}, stage) for c in stage_conds):
                continue
            if rule.pool not in out:
                out.append(rule.pool)
            if len(stage_conds) == len(rule.conditions):  # matches every request of the stage
                return out
        if self.default not in out:
            out.append(self.default)
        return out
