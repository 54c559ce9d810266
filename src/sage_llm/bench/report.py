"""Reports for side-by-side benchmark runs: a rich table, a JSON file and an HTML page.

One :class:`Entry` is one run of one contender (a sage-llm preset or a peer router policy)
at one request rate. :func:`summary_table` renders any list of named summaries as a rich
table (``sage-llm demo`` and ``sage-llm bench compare`` share it); :func:`write_json` writes
every summary with the run's configuration; :func:`write_html` writes PNG plots (latency
CDFs of TTFT and TPOT, goodput per contender, SLO attainment by priority, goodput against
request rate when several rates were run) and a page that shows them with the table.
"""

from __future__ import annotations

import html
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table

from sage_llm import jsonutil
from sage_llm.bench.stats import BenchSummary, RequestMeasurement, tpot, ttft
from sage_llm.errors import ConfigError
from sage_llm.types import RequestPriority

__all__ = [
    "OTHERS",
    "URGENT",
    "Entry",
    "FittedTable",
    "TargetCheck",
    "best_by_goodput",
    "cdf_points",
    "fitted_table",
    "goodput_curves",
    "latency_cells",
    "report_console",
    "summary_table",
    "target_check",
    "urgent_and_rest",
    "write_html",
    "write_json",
]


@dataclass(frozen=True)
class Entry:
    """One contender's run: ``kind`` is ``sage`` or ``peer``; ``rate_rps`` the offered rate
    (requests per simulated second, None when not set); ``extra`` holds figures that only
    some contenders have (prefix-cache hit rate, load-generator lag, warnings)."""

    name: str
    kind: str
    summary: BenchSummary
    measurements: Sequence[RequestMeasurement] = ()
    rate_rps: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (the measurements are left out; the summary has them)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "rate_rps": self.rate_rps,
            "summary": self.summary.to_dict(),
            "extra": dict(self.extra),
        }


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing folder-to-be of ``path`` (itself or an ancestor) that is not a
    folder, if any."""
    for part in (path, *path.parents):
        if part.exists():
            return None if part.is_dir() else part
    return None


def _write_check(path: Path, what: str) -> None:
    """Make ``path``'s folders and try it as a file: a new one is created and removed
    again, an existing one opened for appending and left as it was; ConfigError (key
    ``out``) naming ``what`` when that fails."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with path.open("a"):
                pass
        else:
            with path.open("x"):
                pass
            path.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write {what}: {exc.strerror or exc}", key="out") from None


def check_out_dir(path: Path) -> None:
    """:class:`ConfigError` (key ``out``) unless reports can be written under the folder
    ``path``, tried now (made if missing, a file created in it and removed again), so that
    a bad ``--out`` fails before the benchmark runs rather than after it."""
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise ConfigError(f"{blocker} is a file, not a folder", key="out")
    _write_check(path / f".sage-llm-write-check-{os.getpid()}", f"reports under {path}")


def refuse_repeats(names: Sequence[str], key: str) -> None:
    """ConfigError naming ``key`` for a name given twice: it would run twice, and be
    reported twice under one name."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"{name} is given twice", key=key)
        seen.add(name)


def check_out_file(path: Path) -> None:
    """:class:`ConfigError` (key ``out``) unless a report can be written at ``path``, tried
    now (as :func:`check_out_dir` tries its folder; an existing file is left as it was), so
    that a bad path fails before the benchmark runs rather than after."""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a file", key="out")
    blocker = _file_in_the_way(path.parent)
    if blocker is not None:
        raise ConfigError(f"{blocker} is a file, not a folder", key="out")
    _write_check(path, str(path))


def latency_cells(ttft_s: Sequence[float], e2e_s: Sequence[float]) -> str:
    """``TTFT p50 | p99 | E2E p50 | p99`` of a markdown table row, in seconds (two decimals
    for TTFT, one for E2E), of non-empty samples: the benchmark scripts' per-class rows."""
    t50, t99 = np.percentile(ttft_s, [50, 99])
    e50, e99 = np.percentile(e2e_s, [50, 99])
    return f"{t50:.2f} | {t99:.2f} | {e50:.1f} | {e99:.1f}"


def report_console(width: int = 160) -> Console:
    """The console a benchmark prints its report on: the terminal's width on a terminal,
    else ``width`` columns (a file or a pipe would get 80, and the tables' cells cut
    short)."""
    return Console(width=None if sys.stdout.isatty() else width)


def cdf_points(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """The empirical CDF of ``values``: sorted values and the fraction ≤ each, (i+1)/n."""
    xs = sorted(values)
    n = len(xs)
    return xs, [(i + 1) / n for i in range(n)]


def best_by_goodput(entries: Sequence[Entry], kind: str) -> Entry | None:
    """The entry of ``kind`` with the highest goodput (ties: lower P99 TTFT), or None."""
    pool = [e for e in entries if e.kind == kind]
    if not pool:
        return None

    def key(e: Entry) -> tuple[float, float]:
        p99 = e.summary.ttft.p99 if e.summary.ttft else float("inf")
        return (e.summary.goodput, -p99)

    return max(pool, key=key)


@dataclass(frozen=True)
class TargetCheck:
    """Best sage-llm preset against the best peer policy (issue #7, target 1)."""

    best_sage: str
    best_peer: str
    goodput_ratio: float | None
    """Best sage goodput / best peer goodput (None when the peer's goodput is 0)."""
    p99_ttft_ratio: float | None
    """Best sage P99 TTFT / best peer P99 TTFT (None when either is unmeasured or 0)."""
    goodput_target: float = 1.25
    p99_target: float = 0.7
    rate_rps: float | None = None
    """The offered rate both were run at (None: a run without one)."""

    @property
    def goodput_met(self) -> bool:
        return self.goodput_ratio is not None and self.goodput_ratio >= self.goodput_target

    @property
    def p99_met(self) -> bool:
        return self.p99_ttft_ratio is not None and self.p99_ttft_ratio <= self.p99_target

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_sage": self.best_sage,
            "best_peer": self.best_peer,
            "goodput_ratio": self.goodput_ratio,
            "p99_ttft_ratio": self.p99_ttft_ratio,
            "goodput_target": self.goodput_target,
            "p99_target": self.p99_target,
            "goodput_met": self.goodput_met,
            "p99_met": self.p99_met,
            "rate_rps": self.rate_rps,
        }

    @property
    def where(self) -> str:
        """`` at R req/s`` when the check is of one rate of several, else nothing."""
        return "" if self.rate_rps is None else f" at {self.rate_rps:.2f} req/s"


def target_check(entries: Sequence[Entry]) -> TargetCheck | None:
    """Compare the best ``sage`` entry with the best ``peer`` entry run at the same rate
    (the highest rate both were run at: the most demanding), never across rates (a run at
    1 req/s against one at 20 had met the P99 target); None without both."""
    rates = {e.rate_rps for e in entries if e.kind == "sage"}
    rates &= {e.rate_rps for e in entries if e.kind == "peer"}
    if not rates:
        return None
    rate = max(rates, key=lambda r: -math.inf if r is None else r)
    at_rate = [e for e in entries if e.rate_rps == rate]
    sage, peer = best_by_goodput(at_rate, "sage"), best_by_goodput(at_rate, "peer")
    if sage is None or peer is None:
        return None
    g_ratio = sage.summary.goodput / peer.summary.goodput if peer.summary.goodput > 0 else None
    s_ttft, p_ttft = sage.summary.ttft, peer.summary.ttft
    p_ratio = s_ttft.p99 / p_ttft.p99 if s_ttft and p_ttft and p_ttft.p99 > 0 else None
    return TargetCheck(sage.name, peer.name, g_ratio, p_ratio, rate_rps=rate)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


URGENT: tuple[RequestPriority, ...] = (RequestPriority.CRITICAL, RequestPriority.HIGH)
"""The classes of the "SLO crit/high" column."""
OTHERS: tuple[RequestPriority, ...] = tuple(p for p in RequestPriority if p not in URGENT)
"""The classes of the "SLO others" column."""


def urgent_and_rest(summary: BenchSummary) -> tuple[float | None, float | None]:
    """SLO attainment of the CRITICAL+HIGH requests and of the other requests: each the
    share of those requests that met the SLO (met / requests over the classes together, so
    a class weighs by its request count); None for a group the run had no request of."""
    return summary.slo_attainment_of(URGENT), summary.slo_attainment_of(OTHERS)


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}%}"


def _urgent_and_rest(summary: BenchSummary, digits: int = 1) -> tuple[str, str]:
    urgent, rest = urgent_and_rest(summary)
    return _pct(urgent, digits), _pct(rest, digits)


class FittedTable(Table):
    """A table whose figures are never cut short: when its natural width is more than the
    console's, each right-hand column is set to its narrowest width that cuts no cell and no
    header word (headers wrap), before rich would shrink the columns evenly."""

    def __init__(self, *args: Any, compact_widths: Sequence[int | None] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.compact_widths = list(compact_widths)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        natural = Measurement.get(console, options.update_width(10**6), self).maximum
        if natural <= options.max_width:
            yield from super().__rich_console__(console, options)
            return
        saved = [column.width for column in self.columns]
        for column, width in zip(self.columns, self.compact_widths, strict=False):
            if width is not None:
                column.width = width
        try:
            yield from super().__rich_console__(console, options)
        finally:
            for column, width in zip(self.columns, saved, strict=True):
                column.width = width


def fitted_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> FittedTable:
    """A :class:`FittedTable` of ``rows`` (strings): the left column (names) as wide as its
    longest name and never wrapped, the others right-aligned and never narrower than their
    longest cell; on a console too narrow for all of it, only headers wrap."""
    compact: list[int | None] = [None]
    for i, header in enumerate(headers[1:], start=1):
        cells = max((len(row[i]) for row in rows), default=0)
        compact.append(max(cells, *(len(word) for word in header.split())))
    table = FittedTable(title=title, compact_widths=compact)
    for i, header in enumerate(headers):
        width = max((len(row[i]) for row in rows), default=0)
        if i == 0:
            table.add_column(header, no_wrap=True, min_width=max(width, len(header)))
        else:
            table.add_column(header, justify="right", min_width=width)
    for row in rows:
        table.add_row(*row)
    return table


def summary_table(
    rows: Sequence[tuple[str, BenchSummary]],
    *,
    title: str = "Side by side",
    prefix_hit_rate: Mapping[str, float] | None = None,
) -> Table:
    """A rich table with one row per ``(name, summary)``: completed, goodput, TTFT/TPOT/E2E
    percentiles (ms), SLO attainment of CRITICAL+HIGH and of the other classes (each the
    share of those requests that met the SLO), and the prefix-cache hit rate when
    ``prefix_hit_rate`` has the name. Names and figures are never cut short
    (:func:`fitted_table`); headers take two lines to leave them the room."""
    hits = prefix_hit_rate or {}
    cells = []
    for name, s in rows:
        urgent, rest = _urgent_and_rest(s)
        cells.append(
            (
                name,
                f"{s.ok}/{s.count}",
                f"{s.request_throughput:.2f}",
                f"{s.goodput:.2f}",
                _ms(s.ttft.p50 if s.ttft else None),
                _ms(s.ttft.p99 if s.ttft else None),
                _ms(s.tpot.p50 if s.tpot else None),
                _ms(s.tpot.p99 if s.tpot else None),
                _ms(s.e2e.p99 if s.e2e else None),
                f"{hits[name]:.0%}" if name in hits else "-",
                urgent,
                rest,
            )
        )
    headers = ("contender", "done", "req/s", "goodput\n(req/s)", "TTFT p50\n(ms)",
               "TTFT p99\n(ms)", "TPOT p50\n(ms)", "TPOT p99\n(ms)", "E2E p99\n(ms)",
               "prefix\nhit", "SLO\ncrit/high", "SLO\nothers")  # fmt: skip
    return fitted_table(title, headers, cells)


def _label(e: Entry) -> str:
    return e.name if e.rate_rps is None else f"{e.name} @ {e.rate_rps:.2f} r/s"


def write_json(
    path: Path, config: Mapping[str, Any], entries: Sequence[Entry], **sections: Any
) -> Path:
    """Write ``{"config", "entries", "target_check", **sections}`` to ``path``."""
    check = target_check(entries)
    data = {
        "config": dict(config),
        "entries": [e.to_dict() for e in entries],
        "target_check": None if check is None else check.to_dict(),
        **sections,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(jsonutil.dumps_pretty(data) + "\n", encoding="utf-8")
    return path


def goodput_curves(entries: Sequence[Entry]) -> dict[str, list[tuple[float, float]]]:
    """Goodput against offered rate per contender name, for names run at 2+ rates."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for e in entries:
        if e.rate_rps is not None:
            curves.setdefault(e.name, []).append((e.rate_rps, e.summary.goodput))
    return {k: sorted(v) for k, v in curves.items() if len({r for r, _ in v}) > 1}


def _new_figure(width: float = 7.0, height: float = 4.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _plot_cdf(entries: Sequence[Entry], metric: str, path: Path) -> Path | None:
    fig = _new_figure()
    ax = fig.add_subplot()
    fn = ttft if metric == "ttft" else tpot
    drawn = False
    for e in entries:
        values = [v * 1000 for m in e.measurements if m.ok and (v := fn(m)) is not None]
        if values:
            xs, ys = cdf_points(values)
            ax.step(xs, ys, where="post", label=_label(e))
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel(f"{metric.upper()} (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)
    return path


def _plot_bars(entries: Sequence[Entry], path: Path) -> Path:
    fig = _new_figure(max(7.0, 0.9 * len(entries)), 4.5)
    ax = fig.add_subplot()
    labels = [_label(e) for e in entries]
    colors = ["tab:blue" if e.kind == "sage" else "tab:orange" for e in entries]
    ax.bar(range(len(entries)), [e.summary.goodput for e in entries], color=colors)
    ax.set_xticks(range(len(entries)), labels, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("goodput (req/s meeting the SLO)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(path)
    return path


def _plot_slo_by_priority(entries: Sequence[Entry], path: Path) -> Path | None:
    priorities = sorted({p for e in entries for p in e.summary.slo_attainment_by_priority})
    if not priorities:
        return None
    fig = _new_figure(max(7.0, 0.9 * len(entries)), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(priorities)
    for j, p in enumerate(priorities):
        values = [e.summary.slo_attainment_by_priority.get(p, 0.0) * 100 for e in entries]
        xs = [i + j * width for i in range(len(entries))]
        ax.bar(xs, values, width=width, label=p.name.lower())
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(entries))],
        [_label(e) for e in entries],
        rotation=30,
        ha="right",
        fontsize="small",
    )
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize="small")
    fig.savefig(path)
    return path


def _plot_curves(curves: Mapping[str, list[tuple[float, float]]], path: Path) -> Path | None:
    if not curves:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    for name, points in curves.items():
        ax.plot([r for r, _ in points], [g for _, g in points], marker="o", label=name)
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel("goodput (req/s)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)
    return path


def _html_table(entries: Sequence[Entry]) -> str:
    head = ("contender", "kind", "rate r/s", "done", "goodput r/s", "TTFT p50 ms",
            "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "prefix hit", "SLO crit/high",
            "SLO others")  # fmt: skip
    rows = []
    for e in entries:
        s = e.summary
        urgent, rest = _urgent_and_rest(s)
        hit = e.extra.get("prefix_hit_rate")
        cells = (
            e.name, e.kind, "-" if e.rate_rps is None else f"{e.rate_rps:.2f}",
            f"{s.ok}/{s.count}", f"{s.goodput:.2f}",
            _ms(s.ttft.p50 if s.ttft else None), _ms(s.ttft.p99 if s.ttft else None),
            _ms(s.tpot.p50 if s.tpot else None), _ms(s.tpot.p99 if s.tpot else None),
            _pct(hit, 0) if isinstance(hit, int | float) else "-", urgent, rest,
        )  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def write_html(
    out_dir: Path, config: Mapping[str, Any], entries: Sequence[Entry], *, title: str
) -> Path:
    """Write ``report.html`` and its PNG plots into ``out_dir``; returns the page's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [
        ("TTFT CDF", _plot_cdf(entries, "ttft", out_dir / "ttft_cdf.png")),
        ("TPOT CDF", _plot_cdf(entries, "tpot", out_dir / "tpot_cdf.png")),
        ("Goodput per contender", _plot_bars(entries, out_dir / "goodput.png")),
        ("SLO attainment by priority",
         _plot_slo_by_priority(entries, out_dir / "slo_by_priority.png")),
        ("Goodput vs request rate",
         _plot_curves(goodput_curves(entries), out_dir / "goodput_vs_rate.png")),
    ]  # fmt: skip
    check = target_check(entries)
    check_html = ""
    if check is not None:
        check_html = (
            f"<p>Best sage-llm preset <b>{html.escape(check.best_sage)}</b> vs best peer "
            f"<b>{html.escape(check.best_peer)}</b>{html.escape(check.where)}: goodput ratio "
            f"{'-' if check.goodput_ratio is None else f'{check.goodput_ratio:.2f}'} "
            f"(target ≥ {check.goodput_target}), P99 TTFT ratio "
            f"{'-' if check.p99_ttft_ratio is None else f'{check.p99_ttft_ratio:.2f}'} "
            f"(target ≤ {check.p99_target}).</p>"
        )
    figures = "".join(
        f"<h2>{html.escape(name)}</h2><img src='{p.name}' alt='{html.escape(name)}'>"
        for name, p in plots
        if p is not None
    )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{check_html}{_html_table(entries)}{figures}"
        f"<h2>Configuration</h2><pre>{html.escape(json.dumps(dict(config), indent=2, default=str))}"
        "</pre></body></html>\n"
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
