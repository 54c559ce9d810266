"""Every PromQL query of the Grafana dashboard uses a metric the gateway exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from sage_llm.config import GatewayConfig
from tests.gateway.harness import completion_body, serve

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "sage-llm-dashboard.json"

_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
     "bool", "offset", "le"}
)  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (functions, keywords and labels left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names: set[str] = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("(") or word in _KEYWORDS:
            continue
        names.add(word)
    return names


def _exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def test_metric_names_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(a_seconds_bucket{model="x"}[5m])))'
        " / on (instance) b_total offset 5m"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total"}
    assert metric_names("sage_llm_scheduling_policy == 1") == {"sage_llm_scheduling_policy"}


async def test_every_dashboard_query_uses_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = _exprs(dashboard["panels"])
    assert len(exprs) >= 10
    used = set().union(*(metric_names(e) for e in exprs))
    assert all(name.startswith("sage_llm_") for name in used)

    async with serve(2, reload_from=GatewayConfig) as gw, aiohttp.ClientSession() as http:
        gw.manager.metrics.track_users(["team-a"])  # (as a tenant is): the user series
        for i in range(3):
            body = completion_body(slo_deadline_ms=60_000, stream=i == 0, user="team-a")
            async with http.post(gw.url("/v1/completions"), json=body) as r:
                assert r.status == 200
                await r.read()
        await gw.manager.load_lora_adapter("sql", "/loras/sql")  # the LoRA requests' series
        async with http.post(gw.url("/v1/completions"), json=completion_body(model="sql")) as r:
            assert r.status == 200
        for iid in ("sim-0", "sim-1"):
            gw.manager.drain_instance(iid)
        async with http.post(gw.url("/v1/completions"), json=completion_body()) as r:
            assert r.status == 503
        async with http.post(gw.url("/admin/reload")) as r:  # the reloads' series
            assert r.status == 200
        async with http.get(gw.url("/metrics")) as r:
            exposition = await r.text()

    exported = {
        sample.name
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
    missing = sorted(used - exported)
    assert not missing, f"dashboard queries metrics the gateway does not export: {missing}"


def test_every_exported_metric_is_in_the_gateway_guide() -> None:
    """docs/gateway.md lists every metric the control plane exports, by its scraped name."""
    from sage_llm.control_plane.metrics import ControlPlaneMetrics

    guide = (DASHBOARD.parents[2] / "docs" / "gateway.md").read_text()
    listed = set(re.findall(r"`(sage_llm_[a-z0-9_]+)`", guide))
    families = ControlPlaneMetrics().registry.collect()
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    assert {name for name in exported if name.startswith("sage_llm_")} - listed == set()
    assert "process_resident_memory_bytes" in exported and "`process_*`" in guide


def test_the_data_source_chosen_on_import_is_the_one_used() -> None:
    """Grafana puts the source chosen for each ``__inputs`` entry where ``${NAME}`` is
    written: one written nowhere would leave the panels on the default source."""
    dashboard = json.loads(DASHBOARD.read_text())
    text = DASHBOARD.read_text()
    for entry in dashboard["__inputs"]:
        assert f"${{{entry['name']}}}" in text, entry["name"]
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["current"]["value"] == "${DS_PROMETHEUS}"  # the panels' ${datasource}
