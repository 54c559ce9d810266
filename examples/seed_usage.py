"""The seed proposal's usage, unchanged but for the import: four instances, one request.

Run:  .venv/bin/python examples/seed_usage.py

``mode="simulated"`` gives each registered instance an in-process simulated engine, so this
runs anywhere. With real vLLM servers at those host/ports, drop ``mode`` (it defaults to
``"http"``).
"""

import asyncio

from sage_llm import (
    ControlPlaneManager,
    ExecutionInstance,
    RequestMetadata,
    RequestPriority,
)


async def main() -> None:
    control_plane = ControlPlaneManager(
        scheduling_policy="adaptive",
        enable_pd_separation=True,
        mode="simulated",
    )
    for i in range(4):
        instance = ExecutionInstance(
            instance_id=f"llm-{i}",
            host="localhost",
            port=8000 + i,
            model_name="meta-llama/Llama-2-7b",
            tensor_parallel_size=1,
        )
        control_plane.register_instance(instance)

    await control_plane.start()
    try:
        request = RequestMetadata(
            request_id="req-1",
            prompt="Explain what an LLM control plane does.",
            priority=RequestPriority["HIGH"],
            slo_deadline_ms=2000,
            max_tokens=32,
        )
        request_id = await control_plane.submit_request(request)
        result = await control_plane.wait_for_result(request_id)
        print(f"[{result.instance_id}] {result.status.value}: {result.text.strip()}")
        print(
            f"TTFT {result.ttft_ms:.1f} ms, TPOT {result.tpot_ms:.2f} ms, "
            f"E2E {result.e2e_latency_ms:.1f} ms, SLO met: {result.slo_met}"
        )
    finally:
        await control_plane.stop()


if __name__ == "__main__":
    asyncio.run(main())
