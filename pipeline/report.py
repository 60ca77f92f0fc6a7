"""`docpipe report OUT`: one self-contained HTML file about a finished run.

It reads only what the run recorded: the output rows (a results file, or a job directory's
parts; local or a URI) and the request log beside them (pipeline.request_log). Plots are
PNGs drawn with matplotlib (Agg, no display) and embedded as base64 `data:` URIs, so the file
needs no network and no other file at view time. Sections, each a `<section id=...>`:

- `throughput`: documents finished and tokens per second over the run;
- `latency`: each request as a bar from start to finish, one row per replica, coloured by stage:
  solid until its first token (queued and prefilled), pale after it (decode);
- `kv-cache`: each replica's KV-cache usage over the run (and its running/waiting requests),
  from the samples the replicas took after their steps;
- `prefix-cache`: prefix-cache hit rate over time, per pool (prompt tokens served from the cache);
- `merge-trees`: per document, its chunks and every merge above them (level, group, the chunks
  it covers); a chunk that no summary descends from is drawn red and listed as uncovered;
- `errors`: error rows by cause;
- `experts` (MoE outputs only): an experts x chunks heatmap per document (tokens per expert).

Documents beyond `max_docs` (24) are summarised in the tables but not drawn.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections import Counter
from pathlib import Path

from pipeline.fs import Location, open_local_or_remote
from pipeline.request_log import read_request_logs, sidecar_path

MAX_DOCS = 24
STAGE_COLORS = {"map": "#4c78a8", "ctx": "#72b7b2", "refine": "#f58518", "reduce": "#54a24b"}


# -- what the run recorded ----------------------------------------------------------------


def load_run(out: str | Path):
    """(rows, request table or None, replica stats, wall time) of a results file or a job
    directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.output import read_results

    where = open_local_or_remote(out)
    if not where.exists():
        raise FileNotFoundError(f"{out}: no such results file or job directory; pass the "
                                f"-o of a run or a job's output directory")
    if where.is_dir():
        if isinstance(where, Location):
            files = where.files()
            names = {f.relative_to(where).as_posix(): f for f in files}
        else:
            names = {p.relative_to(where).as_posix(): p for p in where.rglob("*") if p.is_file()}
        parts = [names[n] for n in sorted(names) if re.fullmatch(r"part-\d+\.parquet", n)]
        logs = [names[n] for n in sorted(names) if re.fullmatch(r"_requests/run-\d+\.arrow", n)]
        tables = [pq.read_table(p.path, filesystem=p.fs) if isinstance(p, Location)
                  else pq.read_table(p) for p in parts]
        rows = pa.concat_tables(tables, promote_options="default").to_pylist() if tables else []
    else:
        rows = read_results(out)
        log = sidecar_path(out)
        logs = [log] if log.exists() else []
    requests, replica_stats, wall = read_request_logs(logs)
    return rows, requests, replica_stats, wall


def coverage(row: dict) -> tuple[set[int], list[int]]:
    """(chunks the summary descends from, chunks it does not). With merges the summary is
    the last level's merge: it descends from the chunks in its sources (and a chunk that no
    level-1 merge took is not covered either); without merges (one chunk, refine) every chunk
    feeds the summary."""
    num_chunks = row.get("num_chunks") or len(row.get("chunks") or [])
    all_chunks = set(range(num_chunks))
    merges = row.get("merges") or []
    if row.get("status") != "ok":
        return set(), []
    if not merges:
        return all_chunks, []
    top = max(m["level"] for m in merges)
    covered = set().union(*(set(m["sources"]) for m in merges if m["level"] == top))
    level1 = set().union(*(set(m["sources"]) for m in merges if m["level"] == 1))
    covered &= level1
    return covered, sorted(all_chunks - covered)


def error_cause(row: dict) -> str:
    """An error message without its document's source and numbers: rows group by cause."""
    msg = row.get("error") or "?"
    source = row.get("source") or ""
    if source and msg.startswith(source):
        msg = msg[len(source):].lstrip(": ")
    msg = re.sub(r"^\S+#\d+: ", "", msg)
    msg = re.sub(r"\d+", "N", msg)
    msg = msg.split(" (")[0].split(";")[0]
    return msg[:70]


# -- plots --------------------------------------------------------------------------------


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(width=9.0, height=3.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _patches():
    import matplotlib.patches

    return matplotlib.patches


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_throughput(requests) -> str:
    fig, ax = _figure()
    if requests is None or requests.num_rows == 0:
        _empty(ax, "no request log recorded for this output")
        return _png(fig)
    reqs = requests.to_pylist()
    end = max(r["finish_s"] for r in reqs) or 1.0
    doc_done: dict[str, float] = {}
    for r in reqs:
        doc_done[r["doc_id"]] = max(doc_done.get(r["doc_id"], 0.0), r["finish_s"])
    times = sorted(doc_done.values())
    ax.step([0.0, *times], list(range(len(times) + 1)), where="post", color="#4c78a8")
    ax.set_xlabel("seconds since the run began")
    ax.set_ylabel("documents finished", color="#4c78a8")
    num_bins = 40
    width = end / num_bins
    bins = [0.0] * num_bins
    for r in reqs:  # each request's tokens spread over its time on the replica
        if r["from_store"]:
            continue
        tokens = r["prompt_tokens"] + r["generated_tokens"]
        lo, hi = r["start_s"], max(r["finish_s"], r["start_s"] + 1e-6)
        for b in range(min(num_bins - 1, int(lo / width)), min(num_bins, int(hi / width) + 1)):
            overlap = min(hi, (b + 1) * width) - max(lo, b * width)
            if overlap > 0:
                bins[b] += tokens * overlap / (hi - lo)
    ax2 = ax.twinx()
    ax2.plot([width * (i + 0.5) for i in range(num_bins)], [b / width for b in bins],
             color="#f58518")
    ax2.set_ylabel("tokens / s", color="#f58518")
    ax.set_title("documents and tokens per second over the run")
    return _png(fig)


def plot_latency(requests) -> str:
    reqs = [] if requests is None else [r for r in requests.to_pylist() if not r["from_store"]]
    replicas = sorted({(r["pool"] or "default", r["replica"]) for r in reqs}, key=str)
    # requests batched together on one replica overlap: each gets the first free lane
    lanes: dict[tuple, list[float]] = {rep: [] for rep in replicas}
    placed = []
    for r in sorted(reqs, key=lambda r: r["start_s"]):
        ends = lanes[(r["pool"] or "default", r["replica"])]
        lane = next((i for i, end in enumerate(ends) if end <= r["start_s"]), len(ends))
        ends[lane:lane + 1] = [r["finish_s"]]
        placed.append((r, lane))
    height = {rep: max(1, len(ends)) for rep, ends in lanes.items()}
    base, y = {}, 0.0
    for rep in replicas:
        base[rep] = y
        y += height[rep] + 1
    fig, ax = _figure(9.0, min(8.0, max(2.0, 0.12 * y + 1.2)))
    if not reqs:
        _empty(ax, "no model requests in the log (all served from stored results, or no log)")
        return _png(fig)
    for r, lane in placed:
        rep = (r["pool"] or "default", r["replica"])
        stage = "reduce" if r["stage"].startswith("reduce") else r["stage"]
        color = STAGE_COLORS.get(stage, "#999")
        first = r.get("first_token_s")
        if first is None:  # no first-token time recorded: one bar
            ax.broken_barh([(r["start_s"], max(r["latency_s"], 1e-3))], (base[rep] + lane, 0.8),
                           facecolors=color, edgecolor="none")
            continue
        ax.broken_barh([(r["start_s"], max(first - r["start_s"], 1e-3))],
                       (base[rep] + lane, 0.8), facecolors=color, edgecolor="none")
        ax.broken_barh([(first, max(r["finish_s"] - first, 1e-3))], (base[rep] + lane, 0.8),
                       facecolors=color, alpha=0.35, edgecolor="none")
    ax.set_yticks([base[rep] + height[rep] / 2 for rep in replicas],
                  [f"{p} / replica {i}" for p, i in replicas])
    ax.set_xlabel("seconds since the run began (solid: queued + prefill, pale: decode)")
    handles = [_patches().Patch(color=c, label=s)
               for s, c in STAGE_COLORS.items()]
    ax.legend(handles=handles, loc="upper right", fontsize=7, ncol=4)
    ax.set_title("per-request latency timeline, per replica")
    return _png(fig)


def plot_kv_usage(replica_stats) -> str:
    fig, ax = _figure()
    series = [(r.get("pool", "default"), r.get("replica"), r.get("kv_timeline") or [])
              for r in replica_stats or []]
    series = [s for s in series if s[2]]
    if not series:
        _empty(ax, "no KV-cache samples in the log (a run from before they were recorded)")
        return _png(fig)
    ax2 = ax.twinx()
    for pool, replica, samples in series:
        xs = [t for t, *_ in samples]
        line, = ax.plot(xs, [u for _, u, *_ in samples], label=f"{pool} / replica {replica}")
        ax2.plot(xs, [sum(rest) for _, _, *rest in samples], color=line.get_color(),
                 linestyle=":", linewidth=1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("seconds since the run began")
    ax.set_ylabel("KV-cache blocks in use")
    ax2.set_ylabel("requests running + waiting (dotted)")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("KV-cache usage over time, per replica")
    return _png(fig)


def plot_prefix_hits(requests) -> str:
    fig, ax = _figure()
    reqs = [] if requests is None else [r for r in requests.to_pylist() if not r["from_store"]]
    if not reqs:
        _empty(ax, "no model requests in the log")
        return _png(fig)
    by_pool: dict[str, list[dict]] = {}
    for r in sorted(reqs, key=lambda r: r["finish_s"]):
        by_pool.setdefault(r["pool"] or "default", []).append(r)
    for pool, rs in by_pool.items():
        hits = queries = 0
        xs, ys = [], []
        for r in rs:
            hits += r["cached_tokens"]
            queries += r["prompt_tokens"]
            xs.append(r["finish_s"])
            ys.append(hits / queries if queries else 0.0)
        ax.plot(xs, ys, label=f"{pool}: {ys[-1]:.1%} at the end")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("seconds since the run began")
    ax.set_ylabel("prefix-cache hit rate (cumulative)")
    ax.legend(fontsize=8)
    ax.set_title("prefix-cache hit rate over time")
    return _png(fig)


def plot_merge_tree(row: dict, uncovered: list[int]) -> str:
    merges = row.get("merges") or []
    num_chunks = row.get("num_chunks") or len(row.get("chunks") or [])
    levels = max((m["level"] for m in merges), default=0)
    fig, ax = _figure(min(12.0, 2.0 + 0.35 * max(num_chunks, 4)), 0.6 * (levels + 1) + 1.0)
    for c in range(num_chunks):
        color = "#d62728" if c in uncovered else "#4c78a8"
        ax.add_patch(_patches().Rectangle(
            (c + 0.05, -0.4), 0.9, 0.8, color=color))
    for m in merges:
        lo, hi = min(m["sources"]), max(m["sources"])
        ax.add_patch(_patches().Rectangle(
            (lo + 0.05, m["level"] - 0.35), hi - lo + 0.9, 0.7, color="#54a24b", alpha=0.5))
        ax.text((lo + hi + 1) / 2, m["level"], f"L{m['level']}.{m['index']}", ha="center",
                va="center", fontsize=7)
    ax.set_xlim(0, max(num_chunks, 1))
    ax.set_ylim(-0.6, levels + 0.6)
    ax.set_yticks(range(levels + 1), ["chunks"] + [f"level {i}" for i in range(1, levels + 1)])
    ax.set_xlabel("chunk index" + (f" (red: not covered: {uncovered})" if uncovered else ""))
    ax.set_title(f"{row['doc_id']}: merge tree", fontsize=9)
    return _png(fig)


def plot_errors(rows: list[dict]) -> str:
    causes = Counter(error_cause(r) for r in rows if r.get("status") == "error")
    fig, ax = _figure(9.0, max(1.8, 0.4 * len(causes) + 1.0))
    if not causes:
        _empty(ax, f"no error rows ({len(rows)} documents ok)")
        return _png(fig)
    items = causes.most_common(15)[::-1]
    ax.barh([c for c, _ in items], [n for _, n in items], color="#d62728")
    ax.set_xlabel("error rows")
    ax.set_title("errors by cause")
    return _png(fig)


def plot_experts(row: dict) -> str | None:
    chunks = [c for c in row.get("chunks") or [] if c.get("expert_tokens")]
    if not chunks:
        return None
    num_experts = max(len(c["expert_tokens"]) for c in chunks)
    matrix = [[(c["expert_tokens"] + [0] * num_experts)[e] for c in chunks] for e in range(num_experts)]
    fig, ax = _figure(min(12.0, 2.5 + 0.3 * len(chunks)), 0.25 * num_experts + 1.5)
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(chunks)), [str(c["index"]) for c in chunks], fontsize=7)
    ax.set_xlabel("chunk")
    ax.set_ylabel("expert")
    fig.colorbar(image, ax=ax, label="tokens")
    ax.set_title(f"{row['doc_id']}: tokens per expert and chunk", fontsize=9)
    return _png(fig)


# -- the page -----------------------------------------------------------------------------


def _img(src: str, alt: str) -> str:
    return f'<img src="{src}" alt="{html.escape(alt)}">'


def render_html(rows: list[dict], requests=None, replica_stats=None, wall_s=None, *,
                title: str = "docpipe run", max_docs: int = MAX_DOCS) -> str:
    e = html.escape
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") == "error"]
    num_requests = 0 if requests is None else requests.num_rows
    summary = [
        ("documents", f"{len(rows)} ({len(ok)} ok, {len(failed)} failed)"),
        ("chunks", f"{sum(r.get('num_chunks') or 0 for r in rows):,}"),
        ("document tokens", f"{sum(r.get('num_tokens') or 0 for r in rows):,}"),
        ("prompt / generated tokens", f"{sum(r.get('prompt_tokens') or 0 for r in rows):,} / "
                                      f"{sum(r.get('generated_tokens') or 0 for r in rows):,}"),
        ("requests in the log", str(num_requests)),
        ("wall time", f"{wall_s:.1f} s" if wall_s else "?"),
    ]
    for r in replica_stats or []:
        summary.append((f"replica {r.get('replica')} [{r.get('pool', 'default')}]",
                        f"{r.get('model', '?')}, prefix hit rate "
                        f"{float(r.get('prefix_cache_hit_rate') or 0):.1%}, busy "
                        f"{float(r.get('prefill_time_s') or 0) + float(r.get('decode_time_s') or 0):.1f} s"))
    trees, cover_rows, experts = [], [], []
    for i, row in enumerate(ok):
        covered, uncovered = coverage(row)
        n = row.get("num_chunks") or 0
        flag = (f'<span class="flag">not covered: chunks {", ".join(map(str, uncovered))}</span>'
                if uncovered else "all chunks")
        cover_rows.append(f"<tr class=\"{'uncovered' if uncovered else ''}\"><td>{e(row['doc_id'])}"
                          f"</td><td>{n}</td><td>{len(covered)}</td><td>{flag}</td></tr>")
        if i < max_docs:
            trees.append(f'<figure class="tree" data-doc="{e(row["doc_id"])}">'
                         + _img(plot_merge_tree(row, uncovered), f"merge tree of {row['doc_id']}")
                         + "</figure>")
            heat = plot_experts(row)
            if heat is not None:
                experts.append(f'<figure data-doc="{e(row["doc_id"])}">'
                               + _img(heat, f"experts of {row['doc_id']}") + "</figure>")
    sections = [
        ("throughput", "Documents and tokens per second", _img(plot_throughput(requests), "throughput")),
        ("latency", "Request latency per replica", _img(plot_latency(requests), "latency timeline")),
        ("kv-cache", "KV-cache usage", _img(plot_kv_usage(replica_stats), "KV-cache usage")),
        ("prefix-cache", "Prefix-cache hit rate", _img(plot_prefix_hits(requests), "prefix hit rate")),
        ("merge-trees", "Merge trees and chunk coverage",
         "<table><tr><th>document</th><th>chunks</th><th>covered</th><th>coverage</th></tr>"
         + "".join(cover_rows) + "</table>" + "".join(trees)
         + (f"<p>{len(ok) - max_docs} more documents not drawn.</p>" if len(ok) > max_docs else "")),
        ("errors", "Errors by cause", _img(plot_errors(rows), "errors by cause")
         + "".join(f"<p class=\"err\">{e(r['doc_id'])}: {e(r.get('error') or '')}</p>"
                   for r in failed[:20])),
    ]
    if experts:
        sections.append(("experts", "Experts x chunks (MoE)", "".join(experts)))
    body = "".join(f'<section id="{sid}"><h2>{e(name)}</h2>{content}</section>'
                   for sid, name, content in sections)
    table = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in summary)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ text-align: left; padding: 2px 10px; border-bottom: 1px solid #eee; font-size: 14px; }}
img {{ max-width: 100%; }} figure {{ margin: 0.5em 0; }}
.flag, .err {{ color: #d62728; }} tr.uncovered td {{ background: #fdecea; }}
</style></head><body>
<h1>{e(title)}</h1>
<table id="summary">{table}</table>
{body}
</body></html>
"""


def write_report(out: str | Path, html_path: str | Path | None = None) -> Path | Location:
    """Write the report of the run whose output is `out`; returns where it went (default:
    `_<name>.report.html` beside a results file, `_report.html` inside a job directory:
    `_` names, which dataset readers skip)."""
    rows, requests, replica_stats, wall = load_run(out)
    where = open_local_or_remote(out)
    if html_path is None:
        target = where.join("_report.html") if isinstance(where, Location) and where.is_dir() \
            else (where / "_report.html" if isinstance(where, Path) and where.is_dir()
                  else where.with_name(f"_{where.name}.report.html"))
    else:
        target = open_local_or_remote(html_path)
    page = render_html(rows, requests, replica_stats, wall, title=f"docpipe report: {out}")
    if isinstance(target, Location):
        target.write_bytes(page.encode())
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(target)
    return target
