"""The PD benchmark at toy scale: fleets, the in-process comparison and its report."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest

from sage_llm.bench.pd_bench import (
    MODEL_70B,
    SLO_ITL,
    SLO_TPOT,
    FleetSpec,
    chat_workload,
    default_fleets,
    evaluate_targets,
    fleet_instances,
    format_table,
    long_prompt_workload,
    manager_kwargs,
    pd_bench_main,
    realtime_fleets,
    run_case,
    run_pd_bench,
    select_fleets,
)
from sage_llm.bench.pd_realtime import (
    engine_roles,
    fleet_spec_from_json,
    fleet_spec_json,
    rescale,
    run_realtime,
    sage_manager,
)
from sage_llm.bench.stats import RequestMeasurement
from sage_llm.errors import ConfigError
from sage_llm.types import ExecutionInstanceType, PDSeparationConfig, RequestPriority

CASE_FIELDS = {
    "fleet", "workload", "rate_rps", "requests", "failed", "duration_s", "goodput_rps",
    "slo_attainment", "goodput_tpot_rps", "slo_attainment_tpot", "request_throughput_rps",
    "output_token_throughput", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s",
    "tpot_p50_s", "tpot_p99_s", "pd", "summary",
}  # fmt: skip


def test_default_fleets_fill_the_eight_gpu_node() -> None:
    for model in ("llama-3.1-8b", "llama-3.1-70b"):
        fleets = default_fleets(model)
        assert all(f.gpus == 8 for f in fleets)
        assert fleets[0].decider is None  # the colocated baseline comes first
        assert {f.decider for f in fleets[1:]} <= {"always", "adaptive"}
    assert {f.name for f in default_fleets()} >= {"pd-2:6", "pd-3:5", "pd-4:4"}
    assert all(f.tp == 4 for f in default_fleets("llama-3.1-70b"))


def test_fleet_instances_carry_roles_and_sim_metadata() -> None:
    spec = FleetSpec("pd-3:5", prefill=3, decode=5, decider="always")
    insts = fleet_instances(spec)
    types = [i.instance_type for i in insts]
    assert types.count(ExecutionInstanceType.PREFILLING) == 3
    assert types.count(ExecutionInstanceType.DECODING) == 5
    assert len({i.instance_id for i in insts}) == 8
    assert all(
        i.metadata["sim_gpu"] == "h100" and i.metadata["sim_kv_link_gbps"] > 0 for i in insts
    )
    assert all(i.nvlink_domain == "node-0" for i in insts)
    big = fleet_instances(default_fleets("llama-3.1-70b")[0])
    assert [i.tensor_parallel_size for i in big] == [4, 4]
    assert big[0].metadata["sim_model"] == "llama-3.1-70b"


def test_bad_fleets_are_rejected() -> None:
    with pytest.raises(ValueError, match="decider"):
        FleetSpec("x", prefill=1, decode=1)
    with pytest.raises(ValueError, match="counts"):
        FleetSpec("x")


def test_manager_kwargs_turn_pd_off_for_colocated_and_target_the_slo() -> None:
    assert manager_kwargs(default_fleets()[0]) == {"enable_pd_separation": False}
    adaptive = manager_kwargs(FleetSpec("a", hybrid=8, decider="adaptive"))
    cfg = adaptive["pd_config"]
    assert isinstance(cfg, PDSeparationConfig)
    assert cfg.routing_policy == "adaptive"
    assert cfg.metadata["decider_params"] == {
        "ttft_slo_s": 2.0,
        "tpot_slo_s": 0.025,
        "itl_slo_s": 0.025,
    }
    assert cfg.metadata["kv_bytes_per_token"] == 131072
    tuned = FleetSpec("a", hybrid=8, decider="adaptive", decider_params=(("slack", 0.5),))
    assert manager_kwargs(tuned)["pd_config"].metadata["decider_params"]["slack"] == 0.5
    assert "pairing_params" not in cfg.metadata
    assert "pairing_params" not in tuned.to_dict()
    paired = FleetSpec("a", hybrid=8, decider="adaptive", pairing_params=(("top_k", 2),))
    assert manager_kwargs(paired)["pd_config"].metadata["pairing_params"] == {"top_k": 2}
    assert paired.to_dict()["pairing_params"] == {"top_k": 2}


def test_select_fleets_by_name() -> None:
    assert [f.name for f in select_fleets(["pd-4:4", "colocated"])] == ["pd-4:4", "colocated"]
    with pytest.raises(ConfigError, match="unknown fleet"):
        select_fleets(["pd-9:9"])
    with pytest.raises(ConfigError, match="pd-4:4 is given twice"):  # it would run twice
        select_fleets(["pd-4:4", "colocated", "pd-4:4"])


def test_workloads_have_the_named_shapes() -> None:
    long = long_prompt_workload(20, 5.0, seed=1)
    assert all(4096 <= r.prompt_tokens <= 8192 and 250 <= r.max_tokens <= 350 for r in long)
    chat = chat_workload(20, 5.0, seed=1)
    assert chat.name == "sharegpt_like"
    assert max(r.prompt_tokens for r in chat) < 4097


def test_small_in_process_comparison_produces_a_full_report() -> None:
    fleets = [
        FleetSpec("colocated", general=2),
        FleetSpec("pd-1:1", prefill=1, decode=1, decider="always"),
        FleetSpec("adaptive-hybrid", hybrid=2, decider="adaptive"),
    ]
    report = run_pd_bench(n_long=2, long_rate=4.0, n_chat=3, chat_rate=4.0, fleets=fleets)
    json.dumps(report)  # serialisable
    assert report["slo"] == SLO_ITL.to_dict()
    assert report["slo_secondary"] == SLO_TPOT.to_dict()
    cases = report["cases"]
    assert [(c["workload"], c["fleet"]["name"]) for c in cases] == [
        (w, f.name) for w in ("long_prompt", "sharegpt_like") for f in fleets
    ]
    for case in cases:
        assert set(case) == CASE_FIELDS
        assert case["failed"] == 0
        assert case["requests"] == (2 if case["workload"] == "long_prompt" else 3)
        assert case["ttft_p50_s"] is not None and case["ttft_p99_s"] >= case["ttft_p50_s"]
        assert case["itl_p99_s"] >= case["itl_p50_s"] > 0
        assert case["goodput_rps"] <= case["request_throughput_rps"]
    pd_long = next(c for c in cases if c["fleet"]["name"] == "pd-1:1")
    assert pd_long["pd"]["disaggregated_requests"] == 2
    colo = next(c for c in cases if c["fleet"]["name"] == "colocated")
    assert colo["pd"].get("disaggregated_requests", 0) == 0
    (targets,) = report["targets"]
    assert targets["long_prompt_best_pd"] == "pd-1:1"
    assert set(targets["chat_adaptive_vs_colocated"]) == {"adaptive-hybrid"}
    assert isinstance(targets["long_prompt_target_met"], bool)
    table = format_table(report)
    assert all(f.name in table for f in fleets)


def test_seventy_b_tp4_case_runs() -> None:
    spec = default_fleets("llama-3.1-70b")[1]
    case = run_case(spec, long_prompt_workload(2, 1.0)).to_dict()
    assert case["fleet"]["tp"] == 4
    assert case["pd"]["disaggregated_requests"] == 2
    assert case["failed"] == 0


def _same_case(ours: Any, theirs: Any, where: str = "case") -> None:
    """Two runs of a case agree: every count and name equal, every time to rounding (the
    two runs reach the same instants by different sums)."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict)
        assert ours.keys() == theirs.keys(), where
        for key, value in theirs.items():
            _same_case(ours[key], value, f"{where}.{key}")
    elif isinstance(theirs, float):
        assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12), where
    else:
        assert ours == theirs, where


@pytest.mark.parametrize(
    ("fleet", "model"),
    [
        ("colocated", "llama-3.1-8b"),
        ("pd-3:5", "llama-3.1-8b"),
        ("adaptive-2:2+4", "llama-3.1-8b"),
        ("adaptive-hybrid", "llama-3.1-70b"),
    ],
)
def test_the_cluster_simulator_gives_the_control_planes_figures(fleet: str, model: str) -> None:
    """A case on the cluster simulator (``--cluster``) has the figures it has through the
    control plane over in-process engines, the PD counters included."""
    (spec,) = [f for f in default_fleets(model) if f.name == fleet]
    scale = 1.0 if spec.tp == 1 else 0.25
    for workload in (long_prompt_workload(30, 12.0 * scale), chat_workload(60, 20.0 * scale)):
        ours = run_case(spec, workload, cluster=True).to_dict()
        _same_case(ours, run_case(spec, workload).to_dict())
        assert ours["failed"] == 0


def test_run_pd_bench_on_the_cluster_simulator_says_so() -> None:
    fleets = [FleetSpec("pd-1:1", prefill=1, decode=1, decider="always")]
    report = run_pd_bench(n_long=2, long_rate=4.0, n_chat=0, fleets=fleets, cluster=True)
    assert report["params"]["simulator"] == "cluster"
    assert report["cases"][0]["pd"]["disaggregated_requests"] == 2
    plain = run_pd_bench(n_long=2, long_rate=4.0, n_chat=0, fleets=fleets)
    assert plain["params"]["simulator"] == "control_plane"


def test_run_pd_bench_rejects_empty_and_bad_rates() -> None:
    with pytest.raises(ConfigError):
        run_pd_bench(n_long=0, n_chat=0)
    with pytest.raises(ConfigError):
        run_pd_bench(n_long=1, long_rate=0.0, n_chat=0)
    # each rate named, and an infinite one refused (its report had held Infinity)
    for kwargs, key in (
        ({"chat_rate": math.inf}, "chat_rate"),
        ({"chat_rate": math.nan}, "chat_rate"),
        ({"long_rate": 0.0}, "long_rate"),
        ({"rate_70b_factor": -1.0}, "rate_70b_factor"),
    ):
        with pytest.raises(ConfigError, match="must be a finite number > 0") as info:
            run_pd_bench(n_long=1, n_chat=1, **kwargs)  # type: ignore[arg-type]
        assert info.value.key == key


def test_evaluate_targets_compares_against_colocated() -> None:
    def case(name: str, decider: str | None, workload: str, goodput: float) -> dict[str, object]:
        fleet = {"name": name, "model": "llama-3.1-8b", "decider": decider}
        return {"fleet": fleet, "workload": workload, "goodput_rps": goodput}

    cases = [
        case("colocated", None, "long_prompt", 2.0),
        case("pd-2:6", "always", "long_prompt", 2.5),
        case("pd-3:5", "always", "long_prompt", 4.0),
        case("colocated", None, "sharegpt_like", 10.0),
        case("adaptive-hybrid", "adaptive", "sharegpt_like", 9.0),
    ]
    out = evaluate_targets(cases)
    assert out["long_prompt_best_pd"] == "pd-3:5"
    assert out["long_prompt_best_pd_vs_colocated"] == 2.0
    assert out["long_prompt_target_met"] is True
    assert out["chat_adaptive_vs_colocated"] == {"adaptive-hybrid": 0.9}
    assert out["chat_target_met"] is False


def test_the_targets_are_met_at_exactly_1_5x_and_0_95x_colocated() -> None:
    def case(name: str, decider: str | None, workload: str, goodput: float) -> dict[str, object]:
        fleet = {"name": name, "model": "llama-3.1-8b", "decider": decider}
        return {"fleet": fleet, "workload": workload, "goodput_rps": goodput}

    out = evaluate_targets(
        [
            case("colocated", None, "long_prompt", 2.0),
            case("pd-3:5", "always", "long_prompt", 3.0),
            case("colocated", None, "sharegpt_like", 10.0),
            case("adaptive-hybrid", "adaptive", "sharegpt_like", 9.5),
        ]
    )
    assert out["long_prompt_best_pd_vs_colocated"] == 1.5
    assert out["long_prompt_target_met"] is True  # >= 1.5x
    assert out["chat_adaptive_vs_colocated"] == {"adaptive-hybrid": 0.95}
    assert out["chat_target_met"] is True  # never below 0.95x


def test_pd_bench_main_writes_json_and_prints_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pd.json"
    rc = pd_bench_main(out=out, n_long=1, n_chat=1, include_70b=False, long_rate=1.0)
    assert rc == 0
    report = json.loads(out.read_text())
    assert len(report["cases"]) == 2 * len(default_fleets())
    assert "pd-3:5" in capsys.readouterr().out


def test_rescale_multiplies_every_time() -> None:
    m = RequestMeasurement("r", RequestPriority.NORMAL, None, 1.0, 1.5, [1.5, 1.6], 2.0, 10, 2)
    s = rescale(m, 10.0)
    assert (s.arrival_s, s.first_token_s, tuple(s.token_times_s), s.end_s) == (
        10.0, 15.0, (15.0, 16.0), 20.0,
    )  # fmt: skip


def test_sage_manager_registers_the_processes_by_role_with_the_layouts_settings() -> None:
    """The gateway process's manager: the layout's roles on the engines' URLs, in http
    mode, with the in-process run's decider and pairing and the vllm connector."""
    spec = FleetSpec("pd-1:2", prefill=1, decode=2, decider="always")
    urls = ["http://127.0.0.1:8001", "http://127.0.0.1:8002", "http://127.0.0.1:8003"]
    cp = sage_manager(spec, urls)
    insts = {i.port: (i.instance_type, i.metadata) for i in cp.get_instances()}
    assert insts == {
        8001: (ExecutionInstanceType.PREFILLING, {}),
        8002: (ExecutionInstanceType.DECODING, {}),
        8003: (ExecutionInstanceType.DECODING, {}),
    }
    assert cp.mode == "http"
    pd = cp.get_status()["pd"]
    assert (pd["decider"]["name"], pd["connector"]["name"]) == ("always", "vllm")

    hybrid = FleetSpec("h", hybrid=2, decider="adaptive", pairing_params=(("prefill_reserve", 1),))
    cp = sage_manager(hybrid, urls[:2])
    assert {i.instance_type for i in cp.get_instances()} == {ExecutionInstanceType.HYBRID}
    pd = cp.get_status()["pd"]
    assert pd["decider"]["name"] == "adaptive"
    assert pd["decider"]["params"]["itl_slo_s"] == SLO_ITL.itl_s
    assert pd["pairing"]["params"]["prefill_reserve"] == 1
    assert not sage_manager(FleetSpec("c", general=1), urls[:1]).get_status()["pd"]["enabled"]
    with pytest.raises(ConfigError, match=r"^engine: h has 2 instances, 3 engine URLs given$"):
        sage_manager(hybrid, urls)


def test_the_gateway_process_gets_the_layout_it_was_given() -> None:
    """``--fleet-spec`` carries every field, parameters included, and the engines go in
    layout order with their engine-sim roles (a hybrid instance is a general engine)."""
    spec = FleetSpec(
        "adaptive-1:1+1", prefill=1, decode=1, general=1, hybrid=1, decider="adaptive",
        decider_params=(("slack", 0.5),), pairing_params=(("prefill_reserve", 0),),
    )  # fmt: skip
    assert fleet_spec_from_json(fleet_spec_json(spec)) == spec
    assert engine_roles(spec) == ["prefill", "decode", "general", "general"]


@pytest.mark.parametrize("speed", [0.0, -1.0, float("nan"), float("inf")])
def test_pd_bench_main_checks_the_speed_before_running(
    speed: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(**_kwargs: object) -> dict[str, object]:
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr("sage_llm.bench.pd_bench.run_pd_bench", never)
    with pytest.raises(ConfigError, match=r"^speed: must be a finite number > 0, got "):
        pd_bench_main(speed=speed)


def test_the_cli_sizes_the_run(tmp_path: Path) -> None:
    """``sage-llm bench pd`` takes the script's sizes: a small run is one command."""
    from typer.testing import CliRunner

    from sage_llm.cli import app

    out = tmp_path / "pd.json"
    args = ["bench", "pd", "--n-long", "4", "--n-chat", "6", "--fleets", "colocated,pd-3:5"]
    result = CliRunner().invoke(app, [*args, "--long-rate", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    cases = json.loads(out.read_text())["cases"]
    assert {c["fleet"]["name"] for c in cases} == {"colocated", "pd-3:5"}
    counts = {c["workload"]: c["requests"] for c in cases}
    assert counts == {"long_prompt": 4, "sharegpt_like": 6}
    again = CliRunner().invoke(app, [*args, "--long-rate", "8", "--out", str(out), "--cluster"])
    assert again.exit_code == 0, again.output
    report = json.loads(out.read_text())
    assert report["params"]["simulator"] == "cluster"
    for ours, theirs in zip(report["cases"], cases, strict=True):
        _same_case(ours, theirs)
    bad = CliRunner().invoke(app, ["bench", "pd", "--fleets", "nope"])
    assert bad.exit_code != 0 and "unknown fleet" in bad.output


def _table_case(workload: str, fleet: str, requests: int, failed: int = 0) -> dict[str, Any]:
    return {
        "workload": workload, "fleet": {"name": fleet, "model": "llama-3.1-8b"},
        "requests": requests, "failed": failed, "rate_rps": 20.0, "goodput_rps": 11.82,
        "goodput_tpot_rps": 11.82, "request_throughput_rps": 11.82, "ttft_p50_s": 0.031,
        "ttft_p99_s": 0.069, "itl_p50_s": 0.008, "itl_p99_s": None,
    }  # fmt: skip


def test_the_table_shows_each_rows_size_and_keeps_its_columns_in_line() -> None:
    report = {
        "cases": [_table_case("long_prompt", "pd-3:5", 120),
                  _table_case("sharegpt_like", "adaptive-2:2+4", 300, failed=7)],
        "realtime": {"speed": 2.0, "cases": [_table_case("sharegpt_like",
                                                         "rt:vllm-router-pd-3:5", 6)]},
    }  # fmt: skip
    lines = format_table(report).splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("workload"))
    table = lines[head : head + 4]
    assert table[0].split() == [
        "workload", "model", "fleet", "requests", "failed", "rate", "goodput", "good-tpot",
        "thru", "ttft50", "ttft99", "itl50", "itl99",
    ]  # fmt: skip
    assert [row.split()[3:5] for row in table[1:]] == [["120", "0"], ["300", "7"], ["6", "0"]]
    # every column starts where its header does: each row is as long as the header line
    assert {len(row) for row in table} == {len(table[0])}
    starts = [table[0].index(h) for h in ("model", "fleet", "requests", "itl99")]
    for row in table[1:]:
        assert [row[s - 1] for s in starts] == [" "] * len(starts)
        assert row[starts[0]] != " " and row[starts[1]] != " "
    assert any(line.startswith("rt: rows") and "speed 2.0" in line for line in lines)


def test_realtime_fleets_are_the_8b_layouts_named() -> None:
    assert [f.name for f in realtime_fleets(None)] == ["pd-3:5"]
    names = ["colocated", "pd-2:6", "adaptive-hybrid", "pd-1:1"]
    assert [f.name for f in realtime_fleets(names)] == ["colocated", "pd-2:6", "adaptive-hybrid"]
    with pytest.raises(ConfigError, match=r"^fleets: the real-time part .*runs Llama-3.1-8B.s"):
        realtime_fleets(["pd-1:1"])  # 70B only
    with pytest.raises(ConfigError, match="unknown fleet"):
        realtime_fleets(["nope"])


def test_pd_bench_main_passes_sizes_rates_and_fleets_to_the_realtime_part(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, Any] = {}

    def fake_bench(**kwargs: Any) -> dict[str, Any]:
        seen["bench"] = kwargs
        return {"cases": [], "targets": []}

    async def fake_realtime(**kwargs: Any) -> dict[str, Any]:
        seen["realtime"] = kwargs
        return {"speed": kwargs["speed"], "cases": []}

    monkeypatch.setattr("sage_llm.bench.pd_bench.run_pd_bench", fake_bench)
    monkeypatch.setattr("sage_llm.bench.pd_realtime.run_realtime", fake_realtime)
    rc = pd_bench_main(
        out=None, realtime=True, speed=4.0, seed=3, n_long=7, long_rate=5.0, n_chat=9,
        chat_rate=6.0, fleet_names=["colocated", "pd-2:6", "pd-1:1"],
    )  # fmt: skip
    assert rc == 0
    rt = seen["realtime"]
    assert [f.name for f in rt.pop("fleets")] == ["colocated", "pd-2:6"]
    assert rt == {"speed": 4.0, "seed": 3, "n_long": 7, "long_rate": 5.0, "n_chat": 9,
                  "chat_rate": 6.0}  # fmt: skip
    capsys.readouterr()


def test_a_realtime_run_without_an_8b_layout_is_refused_before_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def never(**_kwargs: object) -> dict[str, object]:
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr("sage_llm.bench.pd_bench.run_pd_bench", never)
    # a 70B layout has no engine-sim processes: say which layouts the real-time part runs
    with pytest.raises(ConfigError, match=r"\(colocated, pd-2:6, .*\); none is among pd-1:1"):
        pd_bench_main(out=None, realtime=True, fleet_names=["pd-1:1"])


def test_realtime_runs_the_sizes_and_layouts_it_is_given() -> None:
    """sage-llm's gateway over engine-sim processes (no peer): a PD layout and an adaptive
    one of hybrid instances, the workload's size, not a fixed 60 + 120, the layout's name
    in the row, and the gateway's PD counters: every request of the PD layout split, every
    one of the adaptive layout either split or kept whole."""
    spec = FleetSpec("pd-1:1", prefill=1, decode=1, decider="always")
    hybrid = FleetSpec("adaptive-hybrid-2", hybrid=2, decider="adaptive")
    rt = asyncio.run(
        run_realtime(
            fleets=[spec, hybrid], n_long=0, n_chat=3, chat_rate=20.0, speed=2.0, peers=False
        )
    )
    pd_case, hybrid_case = rt["cases"]
    for case in rt["cases"]:
        assert (case["workload"], case["requests"], case["failed"]) == ("sharegpt_like", 3, 0)
    assert pd_case["fleet"]["name"] == "rt:sage-llm-pd-1:1"
    assert hybrid_case["fleet"]["name"] == "rt:sage-llm-adaptive-hybrid-2"
    assert [f["name"] for f in rt["fleets"]] == ["pd-1:1", "adaptive-hybrid-2"]
    assert rt["params"]["n_chat"] == 3
    assert (pd_case["pd"]["disaggregated_requests"], pd_case["pd"]["colocated_requests"]) == (
        3, 0,
    )  # fmt: skip
    split, whole = (hybrid_case["pd"][k] for k in ("disaggregated_requests", "colocated_requests"))
    assert split + whole == 3
    # what the gateway learnt of each engine, under its instance id
    learned = hybrid_case["pd"]["learned"]
    assert sorted(learned) == ["hybrid-0", "hybrid-1"]
    assert all(v["est_tpot_ms"] > 0 and v["est_prefill_tokens_per_s"] > 0 for v in learned.values())
    with pytest.raises(ConfigError, match=r"^fleets: c70: the real-time part runs only Llama"):
        asyncio.run(run_realtime(fleets=[FleetSpec("c70", MODEL_70B, tp=4, general=2)]))
    with pytest.raises(ConfigError, match=r"^fleets: tp2: the real-time part runs only Llama"):
        asyncio.run(run_realtime(fleets=[FleetSpec("tp2", tp=2, general=1)]))


@pytest.mark.parametrize("bad", ["/proc/sage-llm-bench/pd.json", "/proc/x.json", "DIR"])
def test_an_unwritable_out_is_refused_before_running(
    bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(**_kwargs: object) -> dict[str, object]:
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr("sage_llm.bench.pd_bench.run_pd_bench", never)
    out = tmp_path if bad == "DIR" else Path(bad)
    with pytest.raises(ConfigError, match=rf"^out: (cannot write )?{out}") as info:
        pd_bench_main(out=out)
    assert "\n" not in info.value.message


def test_bench_pd_writes_its_report_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sage-llm bench --help`` says every benchmark writes a report: bench pd's default
    path, like bench compare's, is under bench-out/."""
    from typer.testing import CliRunner

    from sage_llm.cli import app

    monkeypatch.chdir(tmp_path)
    args = ["bench", "pd", "--n-long", "1", "--n-chat", "0", "--fleets", "colocated"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = tmp_path / "bench-out" / "pd" / "pd.json"
    assert "report written to bench-out/pd/pd.json" in result.output
    cases = json.loads(report.read_text())["cases"]
    # the layout for both models: --include-70b is the default, and --fleets names layouts
    assert [(c["fleet"]["model"], c["requests"]) for c in cases] == [
        ("llama-3.1-8b", 1), ("llama-3.1-70b", 1),
    ]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--no-include-70b"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(report.read_text())["cases"]) == 1
    result = CliRunner().invoke(app, ["bench", "pd", "--n-long", "0", "--n-chat", "0"])
    assert result.exit_code == 1
    assert "n_long and n_chat are both 0" in result.output
    result = CliRunner().invoke(app, ["bench", "pd", "--fleets", ""])
    assert result.exit_code == 1 and "no fleet named; valid: colocated" in result.output
    # a 70B-only layout with the 70B runs off is refused, not dropped
    fleets = ["--fleets", "colocated,pd-1:1", "--no-include-70b"]
    result = CliRunner().invoke(app, ["bench", "pd", "--n-long", "1", "--n-chat", "0", *fleets])
    assert result.exit_code == 1
    assert "pd-1:1: 70B layout(s) only, which this run leaves out" in result.output
