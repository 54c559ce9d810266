"""Tests for the benchmark report: CDFs, target check, curves, table, JSON and HTML."""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from sage_llm.bench.report import (
    Entry,
    _html_table,
    best_by_goodput,
    cdf_points,
    check_out_dir,
    check_out_file,
    goodput_curves,
    latency_cells,
    report_console,
    summary_table,
    target_check,
    urgent_and_rest,
    write_html,
    write_json,
)
from sage_llm.bench.stats import SLO, BenchSummary, RequestMeasurement, summarize
from sage_llm.errors import ConfigError
from sage_llm.types import RequestPriority

SLO_1S = SLO(ttft_s=1.0, tpot_s=0.05)


def _m(i: int, ttft_s: float, tokens: int = 3, tpot_s: float = 0.01,
       priority: RequestPriority = RequestPriority.NORMAL) -> RequestMeasurement:  # fmt: skip
    first = float(i) + ttft_s
    times = [first + k * tpot_s for k in range(tokens)]
    return RequestMeasurement(
        request_id=f"r{i}", priority=priority, user_id=None, arrival_s=float(i),
        first_token_s=first, token_times_s=times, end_s=times[-1], prompt_tokens=10,
        output_tokens=tokens,
    )  # fmt: skip


def _summary(
    ttfts: list[float], duration: float = 10.0
) -> tuple[BenchSummary, list[RequestMeasurement]]:
    ms = [_m(i, t) for i, t in enumerate(ttfts)]
    return summarize(ms, duration, SLO_1S), ms


def test_cdf_points_sorted_with_fractions() -> None:
    xs, ys = cdf_points([3.0, 1.0, 2.0, 2.0])
    assert xs == [1.0, 2.0, 2.0, 3.0]
    assert ys == [0.25, 0.5, 0.75, 1.0]
    assert cdf_points([]) == ([], [])


def test_target_check_ratios_hand_computed() -> None:
    # sage: 4 of 4 meet the 1 s TTFT over 10 s -> goodput 0.4; peer: 2 of 4 -> 0.2.
    sage, _ = _summary([0.1, 0.2, 0.3, 0.4])
    peer, _ = _summary([0.5, 0.6, 2.0, 3.0])
    weak, _ = _summary([5.0, 5.0, 5.0, 5.0])
    entries = [Entry("fifo", "sage", weak), Entry("slo", "sage", sage),
               Entry("rr", "peer", peer)]  # fmt: skip
    check = target_check(entries)
    assert check is not None
    assert (check.best_sage, check.best_peer) == ("slo", "rr")
    assert check.goodput_ratio == pytest.approx(2.0)
    assert sage.ttft is not None and peer.ttft is not None
    assert check.p99_ttft_ratio == pytest.approx(sage.ttft.p99 / peer.ttft.p99)
    assert check.goodput_met and check.p99_met
    assert check.to_dict()["goodput_met"] is True


def test_target_check_compares_runs_at_one_rate() -> None:
    """sage-llm at 1 req/s against a peer at 20 had met the P99 target: the check is of
    the highest rate both were run at, and says which."""
    good, _ = _summary([0.1, 0.1, 0.1, 0.1])
    bad, _ = _summary([5.0, 5.0, 5.0, 0.1])
    peer, _ = _summary([0.5, 0.5, 0.5, 0.5])
    entries = [Entry("slo", "sage", good, rate_rps=1.0), Entry("slo", "sage", bad, rate_rps=20.0),
               Entry("rr", "peer", peer, rate_rps=20.0), Entry("rr", "peer", peer, rate_rps=1.0),
               Entry("rr", "peer", peer, rate_rps=40.0)]  # fmt: skip
    check = target_check(entries)
    assert check is not None and check.rate_rps == 20.0
    assert check.goodput_ratio == pytest.approx(0.25) and not check.p99_met
    assert check.where == " at 20.00 req/s" and check.to_dict()["rate_rps"] == 20.0
    assert target_check([Entry("slo", "sage", good, rate_rps=1.0),
                         Entry("rr", "peer", peer, rate_rps=2.0)]) is None  # fmt: skip


def test_target_check_of_a_sage_run_without_a_ttft_has_no_p99_ratio() -> None:
    failed = RequestMeasurement("r0", RequestPriority.NORMAL, None, 0.0, None, (), 1.0, 10, 0,
                                ok=False, error="boom")  # fmt: skip
    dead = summarize([failed], 10.0, SLO_1S)
    assert dead.ttft is None
    peer, _ = _summary([0.1, 0.2])
    check = target_check([Entry("dead", "sage", dead), Entry("rr", "peer", peer)])
    assert check is not None and check.p99_ttft_ratio is None and not check.p99_met


def test_target_check_needs_both_kinds_and_handles_zero_goodput() -> None:
    sage, _ = _summary([0.1])
    assert target_check([Entry("a", "sage", sage)]) is None
    zero, _ = _summary([5.0])
    check = target_check([Entry("a", "sage", sage), Entry("b", "peer", zero)])
    assert check is not None and check.goodput_ratio is None and not check.goodput_met


def test_best_by_goodput_breaks_ties_on_p99_ttft() -> None:
    fast, _ = _summary([0.1, 0.1])
    slow, _ = _summary([0.9, 0.9])
    best = best_by_goodput([Entry("slow", "sage", slow), Entry("fast", "sage", fast)], "sage")
    assert best is not None and best.name == "fast"
    assert best_by_goodput([], "peer") is None


def test_goodput_curves_only_for_names_with_several_rates() -> None:
    s1, _ = _summary([0.1])
    s2, _ = _summary([0.1, 0.2])
    entries = [Entry("a", "sage", s2, rate_rps=2.0), Entry("a", "sage", s1, rate_rps=1.0),
               Entry("b", "peer", s1, rate_rps=1.0)]  # fmt: skip
    assert goodput_curves(entries) == {"a": [(1.0, 0.1), (2.0, 0.2)]}
    # one rate twice is not a curve
    assert goodput_curves([Entry("a", "sage", s1, rate_rps=1.0),
                           Entry("a", "sage", s2, rate_rps=1.0)]) == {}  # fmt: skip


def test_summary_table_rows_and_slo_columns() -> None:
    ms = [_m(0, 0.1, priority=RequestPriority.CRITICAL), _m(1, 2.0, priority=RequestPriority.HIGH),
          _m(2, 0.1, priority=RequestPriority.LOW)]  # fmt: skip
    s = summarize(ms, 10.0, SLO_1S)
    table = summary_table([("p", s)], title="t", prefix_hit_rate={"p": 0.5})
    console = Console(width=250, record=True)
    console.print(table)
    text = console.export_text()
    assert "2/3" not in text and "3/3" in text
    assert "50.0%" in text  # CRITICAL met, HIGH missed
    assert "100.0%" in text  # LOW met
    assert "50%" in text  # prefix hit rate
    headers = [str(column.header).replace("\n", " ") for column in table.columns]
    assert [h for h in headers if h.startswith(("TTFT", "TPOT", "E2E"))] == [
        "TTFT p50 (ms)", "TTFT p99 (ms)", "TPOT p50 (ms)", "TPOT p99 (ms)", "E2E p99 (ms)",
    ]  # fmt: skip
    assert "goodput (req/s)" in headers


def test_each_column_holds_its_own_figure_in_the_table_and_the_html() -> None:
    """TTFT, TPOT and E2E percentiles all differ; BACKGROUND counts among the others."""
    crit, normal = RequestPriority.CRITICAL, RequestPriority.NORMAL
    ms = [_m(0, 0.1, tokens=4, tpot_s=0.02, priority=crit), _m(1, 0.3, tokens=6, tpot_s=0.05),
          _m(2, 5.0, tokens=3, tpot_s=0.2, priority=RequestPriority.BACKGROUND),
          _m(3, 0.2, tokens=5, tpot_s=0.03, priority=normal)]  # fmt: skip
    s = summarize(ms, 10.0, SLO(ttft_s=1.0, tpot_s=None))
    assert s.ttft is not None and s.tpot is not None and s.e2e is not None
    ms_of = {"TTFT p50": s.ttft.p50, "TTFT p99": s.ttft.p99, "TPOT p50": s.tpot.p50,
             "TPOT p99": s.tpot.p99}  # fmt: skip
    figures = {f"{k} (ms)": f"{v * 1000:.0f}" for k, v in ms_of.items()}
    assert len(set(figures.values())) == 4
    slo = {"SLO crit/high": "100.0%", "SLO others": "66.7%"}  # BACKGROUND missed
    table = summary_table([("x", s)])
    row = {str(c.header).replace("\n", " "): str(next(iter(c.cells))) for c in table.columns}
    expected = figures | slo | {"E2E p99 (ms)": f"{s.e2e.p99 * 1000:.0f}"}
    assert {header: row[header] for header in expected} == expected
    page = _html_table([Entry("x", "sage", s)])
    cells = dict(zip(re.findall(r"<th>([^<]*)</th>", page), re.findall(r"<td>([^<]*)</td>", page),
                     strict=True))  # fmt: skip
    expected = {k.replace("(ms)", "ms"): v for k, v in figures.items()} | slo
    assert {header: cells[header] for header in expected} == expected


def test_write_json_and_html(tmp_path: Path) -> None:
    sage, ms = _summary([0.1, 0.2, 0.3])
    peer, pms = _summary([0.5, 2.0, 3.0])
    entries = [Entry("slo", "sage", sage, ms, rate_rps=1.0, extra={"prefix_hit_rate": 0.3}),
               Entry("rr", "peer", peer, pms, rate_rps=1.0)]  # fmt: skip
    path = write_json(tmp_path / "r.json", {"engines": 4}, entries, notes=["x"])
    data = json.loads(path.read_text())
    assert data["config"] == {"engines": 4}
    assert [e["name"] for e in data["entries"]] == ["slo", "rr"]
    assert data["entries"][0]["summary"]["slo_met"] == 3
    assert data["target_check"]["goodput_ratio"] == pytest.approx(3.0)
    assert data["notes"] == ["x"]
    page = write_html(tmp_path / "html", {"engines": 4}, entries, title="a <b> c")
    text = page.read_text()
    assert "a &lt;b&gt; c" in text
    for png in ("ttft_cdf.png", "tpot_cdf.png", "goodput.png", "slo_by_priority.png"):
        assert (tmp_path / "html" / png).read_bytes()[:4] == b"\x89PNG"
        assert png in text
    assert not (tmp_path / "html" / "goodput_vs_rate.png").exists()


def _classes(counts: dict[RequestPriority, tuple[int, int]]) -> BenchSummary:
    """A summary whose class ``p`` has ``counts[p] = (met, requests)``."""
    ms: list[RequestMeasurement] = []
    for p, (met, n) in counts.items():
        ms += [_m(len(ms), 0.1 if k < met else 5.0, priority=p) for k in range(n)]
    return summarize(ms, 100.0, SLO_1S)


def test_slo_columns_are_shares_of_requests_not_means_of_class_rates() -> None:
    crit, high = RequestPriority.CRITICAL, RequestPriority.HIGH
    normal, low = RequestPriority.NORMAL, RequestPriority.LOW
    # CRITICAL 48 of 48, HIGH 26 of 36 (72.2%): 74 of 84 urgent requests met (88.1%; the
    # mean of the class rates would say 86.1%). NORMAL 10 of 10, LOW 0 of 90: 10 of 100.
    s = _classes({crit: (48, 48), high: (26, 36), normal: (10, 10), low: (0, 90)})
    assert s.slo_counts_by_priority == {crit: (48, 48), high: (26, 36), normal: (10, 10),
                                        low: (0, 90)}  # fmt: skip
    urgent, rest = urgent_and_rest(s)
    assert urgent == pytest.approx(74 / 84) and rest == pytest.approx(10 / 100)
    console = Console(width=200, record=True)
    console.print(summary_table([("p", s)]))
    text = console.export_text()
    assert "88.1%" in text and "86.1%" not in text
    assert "10.0%" in text and "50.0%" not in text
    html_text = _html_table([Entry("p", "sage", s)])
    assert "88.1%" in html_text and "10.0%" in html_text
    only_low = _classes({low: (1, 2)})
    assert urgent_and_rest(only_low) == (None, 0.5)
    assert only_low.to_dict()["slo_counts_by_priority"] == {"low": {"met": 1, "requests": 2}}


@pytest.mark.parametrize("width", [160, 132])
def test_summary_table_shows_every_contender_name_whole(width: int) -> None:
    s, _ = _summary([0.1, 0.2])
    names = ["fifo + load_balanced", "priority (no aging) + load_balanced",
             "sglang-router power_of_two", "vllm-router cache_aware"]  # fmt: skip
    console = Console(width=width, record=True)
    console.print(summary_table([(n, s) for n in names], prefix_hit_rate={names[0]: 0.25}))
    text = console.export_text()
    for name in names:
        assert name in text, text
    assert "…" not in text.split("\n", 4)[-1]  # no cell cut short (headers may be)
    assert "25%" in text


def test_the_html_table_shows_the_prefix_hit_rate_when_known() -> None:
    s, _ = _summary([0.1])
    page = _html_table([Entry("a", "peer", s, extra={"prefix_hit_rate": 0.42}),
                        Entry("b", "peer", s)])  # fmt: skip
    assert "<th>prefix hit</th>" in page and "<td>42%</td>" in page


def test_check_out_file_leaves_no_file_behind(tmp_path: Path) -> None:
    new = tmp_path / "a" / "b" / "pd.json"
    check_out_file(new)
    assert not new.exists() and new.parent.is_dir()
    old = tmp_path / "old.json"
    old.write_text("kept")
    check_out_file(old)
    assert old.read_text() == "kept"


def test_check_out_dir_makes_the_folder_and_leaves_nothing_in_it(tmp_path: Path) -> None:
    out = tmp_path / "x" / "y"
    check_out_dir(out)
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.mark.parametrize("check", [check_out_dir, check_out_file])
def test_a_file_where_a_folder_goes_is_named(check: Callable[[Path], None], tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ConfigError) as info:
        check(afile / "sub" / "report.json")
    assert info.value.key == "out"
    assert info.value.message == f"out: {afile} is a file, not a folder"
    with pytest.raises(ConfigError, match=r"^out: cannot write"):
        check(Path("/proc/sage-llm-nowhere/x"))


def test_the_report_is_160_columns_wide_when_output_is_not_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a file or a pipe, not a terminal
    assert report_console().width == 160


def test_latency_cells_give_ttft_and_e2e_percentiles_as_table_cells() -> None:
    ttft = [0.1 * n for n in range(1, 101)]
    assert latency_cells(ttft, [10.0] * 100) == "5.05 | 9.90 | 10.0 | 10.0"
    assert latency_cells([0.25], [3.0]) == "0.25 | 0.25 | 3.0 | 3.0"
