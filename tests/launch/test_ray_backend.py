"""The Ray backend: placement-group specs (pure), and a live launch when ``ray`` is installed."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.control_plane.parallelism import PlannedInstance
from sage_llm.errors import ConfigError, EngineError, EngineTimeoutError
from sage_llm.launch import LaunchSettings, engines_from_plan
from sage_llm.launch.ray_backend import launch_with_ray, placement_group_specs
from sage_llm.types import ExecutionInstanceType, RequestMetadata, RequestStatus
from tests.factories import free_ports

HAS_RAY = importlib.util.find_spec("ray") is not None
PREFILL = ExecutionInstanceType.PREFILLING
DECODE = ExecutionInstanceType.DECODING
GENERAL = ExecutionInstanceType.GENERAL


def test_one_strict_pack_group_per_instance_with_a_bundle_per_gpu() -> None:
    plan = [
        PlannedInstance(PREFILL, 2, 1, 1, (0, 1)),
        PlannedInstance(DECODE, 2, 2, 1, (2, 3, 4, 5)),
    ]
    engines = engines_from_plan(plan, LaunchSettings(engine="vllm", model="m", machine_id="n"))
    specs = placement_group_specs(engines, cpus_per_engine=2.0)
    assert [s.name for s in specs] == ["sage-llm-n-prefill-0", "sage-llm-n-decode-0"]
    assert {s.strategy for s in specs} == {"STRICT_PACK"}
    assert [list(map(dict, s.bundles)) for s in specs] == [
        [{"CPU": 2.0}, {"GPU": 1.0}, {"GPU": 1.0}],
        [{"CPU": 2.0}, {"GPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0}],
    ]
    assert specs[0].gpu_bundles == (1, 2)


def test_simulated_engines_need_no_gpu_bundles() -> None:
    engines = engines_from_plan([PlannedInstance(GENERAL, 4, 1, 1, (0, 1, 2, 3))], LaunchSettings())
    (spec,) = placement_group_specs(engines, use_gpus=False)
    assert [dict(b) for b in spec.bundles] == [{"CPU": 1.0}] and spec.gpu_bundles == ()
    with pytest.raises(ConfigError, match="cpus_per_engine"):
        placement_group_specs(engines, cpus_per_engine=0)


@pytest.mark.skipif(HAS_RAY, reason="ray is installed")
async def test_without_ray_the_backend_says_which_extra_to_install() -> None:
    with pytest.raises(ConfigError, match=r"pip install 'sage-llm\[ray\]'"):
        await launch_with_ray([])


@pytest.fixture
def ray_cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
async def test_two_simulated_engines_as_ray_actors(ray_cluster: Any, tmp_path: Path) -> None:
    base = free_ports(2)
    settings = LaunchSettings(
        base_port=base, log_dir=tmp_path, health_poll_s=0.1, stop_grace_s=5, health_timeout_s=120
    )
    plan = [PlannedInstance(GENERAL, 1, 1, 1, (0,)), PlannedInstance(GENERAL, 1, 1, 1, (1,))]
    engines = engines_from_plan(plan, settings)
    async with ControlPlaneManager(scheduling_policy="fifo", routing_strategy="round_robin") as cp:
        fleet = await launch_with_ray(engines, manager=cp, settings=settings, use_gpus=False)
        async with fleet:
            assert len(cp.get_instances()) == 2
            assert {i.metadata["backend"] for i in cp.get_instances()} == {"ray"}
            node_ip = ray_cluster.util.get_node_ip_address()
            assert {i.machine_id for i in cp.get_instances()} == {node_ip}  # loopback bind too
            results = await asyncio.gather(
                *(
                    cp.generate(
                        RequestMetadata(f"r{k}", prompt="hi", max_tokens=4, model_name="llama-3-8b")
                    )
                    for k in range(4)
                )
            )
            assert all(r.status is RequestStatus.COMPLETED for r in results)
            assert {r.instance_id for r in results} == {e.instance_id for e in engines}
        assert cp.get_instances() == []
    assert ray_cluster.util.placement_group_table() and all(
        pg["state"] == "REMOVED" for pg in ray_cluster.util.placement_group_table().values()
    )


def _all_removed(ray: Any) -> bool:
    table = ray.util.placement_group_table()
    return bool(table) and all(pg["state"] == "REMOVED" for pg in table.values())


@pytest.mark.slow
async def test_an_engine_that_exits_at_once_fails_the_launch_by_name(
    ray_cluster: Any, tmp_path: Path
) -> None:
    settings = LaunchSettings(
        base_port=free_ports(1), log_dir=tmp_path, health_poll_s=0.1, extra_args=("--bogus",)
    )
    engines = engines_from_plan([PlannedInstance(GENERAL, 1, 1, 1, (0,))], settings)
    with pytest.raises(EngineError, match=r"(?s)'local-general-0' exited with code 2.*--bogus"):
        await launch_with_ray(engines, settings=settings, use_gpus=False)
    assert _all_removed(ray_cluster)


@pytest.mark.slow
async def test_a_group_the_cluster_cannot_place_fails_the_launch_by_name(
    ray_cluster: Any, tmp_path: Path
) -> None:
    settings = LaunchSettings(base_port=free_ports(1), log_dir=tmp_path, health_timeout_s=1)
    engines = engines_from_plan([PlannedInstance(GENERAL, 1, 1, 1, (0,))], settings)
    async with asyncio.timeout(60):  # (the launch used to wait for it forever)
        with pytest.raises(EngineTimeoutError, match=r"'local-general-0'.*GPU 1.* GPU 0 in all"):
            await launch_with_ray(engines, settings=settings)  # GPU bundles; the cluster has none
    assert _all_removed(ray_cluster)


@pytest.mark.slow
async def test_a_second_cancellation_mid_launch_still_stops_the_engine(
    ray_cluster: Any, tmp_path: Path
) -> None:
    settings = LaunchSettings(base_port=free_ports(1), log_dir=tmp_path, stop_grace_s=5)
    (engine,) = engines_from_plan([PlannedInstance(GENERAL, 1, 1, 1, (0,))], settings)
    started = tmp_path / "started"
    os.mkfifo(started)  # the engine writes its pid there: read once it runs
    never_healthy = ("sh", "-c", f"echo $$ > {started} && exec sleep 60")
    engine = dataclasses.replace(engine, argv=never_healthy)
    task = asyncio.create_task(launch_with_ray([engine], settings=settings, use_gpus=False))
    async with asyncio.timeout(60):
        pid = int(await asyncio.to_thread(started.read_text))
    task.cancel()
    for _ in range(5):  # into the launch's cleanup
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert _all_removed(ray_cluster)
