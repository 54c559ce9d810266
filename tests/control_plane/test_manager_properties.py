"""The control plane's promise on random operation sequences (hypothesis), on the virtual
clock: whatever is submitted, cancelled, drained, removed, registered or switched meanwhile,
every accepted request ends (completed, failed with a typed error, or cancelled), its
status is terminal, and the metrics count the outcomes as they were."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sage_llm import ControlPlaneManager, RequestPriority, RequestResult, RequestStatus
from sage_llm.control_plane.scheduling.registry import POLICY_NAMES
from sage_llm.errors import RequestNotFoundError, SageLLMError
from sage_llm.sim.clock import run_virtual
from tests.factories import make_instance, make_metadata

Op = tuple[str, int, int, RequestPriority, str, float, bool]

_OP = st.tuples(
    st.sampled_from(["submit", "cancel", "drain", "remove", "register", "policy", "sleep"]),
    st.integers(0, 40),  # which request / instance; max tokens
    st.integers(1, 300),  # prompt words
    st.sampled_from(list(RequestPriority)),
    st.sampled_from(POLICY_NAMES),
    st.floats(0, 0.2),  # seconds slept
    st.booleans(),  # draining (or back)
)


async def _apply(
    cp: ControlPlaneManager, ops: list[Op], bound: int
) -> list[asyncio.Task[RequestResult]]:
    tasks: list[asyncio.Task[RequestResult]] = []
    for kind, n, words, priority, policy, seconds, draining in ops:
        try:
            if kind == "submit":
                meta = make_metadata(
                    f"r{len(tasks)}", prompt="hello " * words, max_tokens=n + 1, priority=priority
                )
                tasks.append(asyncio.ensure_future(cp.generate(meta)))
                await asyncio.sleep(0)
            elif kind == "cancel" and tasks:
                await cp.cancel_request(f"r{n % len(tasks)}")
            elif kind == "drain":
                cp.drain_instance(f"sim-{n % 4}", draining)
            elif kind == "remove":
                cp.unregister_instance(f"sim-{n % 4}")
            elif kind == "register":
                cp.register_instance(
                    make_instance(f"sim-{n % 6}", port=8000 + n % 6, max_concurrent_requests=bound)
                )
            elif kind == "policy":
                cp.update_policy(policy)
            elif kind == "sleep":
                await asyncio.sleep(seconds)
        except SageLLMError:  # an unknown instance, one registered twice …: refused, typed
            pass
    return tasks


@settings(
    derandomize=True, max_examples=100, deadline=None, suppress_health_check=list(HealthCheck)
)
@given(
    st.lists(_OP, min_size=1, max_size=30),
    st.integers(1, 3),
    st.integers(1, 4),
    st.sampled_from(POLICY_NAMES),
    st.integers(1, 20),
)
def test_every_accepted_request_ends_and_is_counted(
    ops: list[Op], instances: int, bound: int, policy: str, queue_size: int
) -> None:
    async def main() -> None:
        cp = ControlPlaneManager(
            mode="simulated", scheduling_policy=policy, max_queue_size=queue_size
        )
        for i in range(instances):
            cp.register_instance(
                make_instance(f"sim-{i}", port=8000 + i, max_concurrent_requests=bound)
            )
        await cp.start()
        try:
            tasks = await _apply(cp, ops, bound)
            # one instance that stays, so that what waits for one is served
            cp.register_instance(make_instance("sim-9", port=8009, max_concurrent_requests=bound))
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=600)
                assert not pending, f"{len(pending)} requests never ended"
            statuses = []
            for i, task in enumerate(tasks):
                exc = task.exception()
                assert exc is None or isinstance(exc, SageLLMError), repr(exc)
                try:
                    statuses.append(await cp.get_request_status(f"r{i}"))
                except RequestNotFoundError:  # refused at intake (no instance, queue full …)
                    assert exc is not None and exc.http_status in (404, 429, 503), repr(exc)
            assert all(s.is_terminal for s in statuses), statuses
            metrics = cp.get_metrics()
            assert metrics.completed_requests == statuses.count(RequestStatus.COMPLETED)
            assert metrics.cancelled_requests == statuses.count(RequestStatus.CANCELLED)
            assert (metrics.active_requests, metrics.queued_requests) == (0, 0)
        finally:
            await cp.stop()

    run_virtual(main())
