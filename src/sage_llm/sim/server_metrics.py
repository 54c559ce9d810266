"""The simulated engine server's ``/metrics``: vLLM's metric names and histograms."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sage_llm.engines.base import EngineStats, Usage

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
_LABELS = ("model_name", "engine")


class ServerMetrics:
    """The server's Prometheus registry (one per app): vLLM's latency histograms, measured
    from chunk timings, plus gauges and counters from the engine's stats at scrape time."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self._values = (model_name, "0")
        self._stats = EngineStats()
        self._lora: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
        # vLLM creates its finished-reason series at 0, before the first request ends; its
        # "abort" stays 0: vLLM 0.32 counts no request whose client went away (nor does
        # it time its end)
        self._finished: dict[str, int] = {"abort": 0, "length": 0, "stop": 0}

        def hist(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, _LABELS, registry=self.registry, buckets=buckets)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Inter-token latency.", _ITL_BUCKETS)
        self.e2e = hist(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency.", _E2E_BUCKETS
        )
        self.queue = hist(
            "vllm:request_queue_time_seconds", "Time spent waiting in the queue.", _E2E_BUCKETS
        )
        for histogram in (self.ttft, self.itl, self.e2e, self.queue):
            histogram.labels(*self._values)  # expose zero-count series from the start
        self.registry.register(self)

    def observe_request(
        self,
        arrival: float,
        times: Sequence[float],
        finish: str,
        usage: Usage,
        *,
        queue_s: float | None = None,
    ) -> None:
        """Record one finished request: ``times`` are the clock readings of its chunks
        (each timed as it came, :meth:`observe_token`: its end and queue time here)."""
        if times:
            self.e2e.labels(*self._values).observe(max(0.0, times[-1] - arrival))
        if queue_s is not None:
            self.queue.labels(*self._values).observe(max(0.0, queue_s))
        self._finished[finish] = self._finished.get(finish, 0) + 1

    def observe_token(self, arrival: float, last: float | None, now: float) -> float:
        """Time a chunk read at ``now`` as it comes, as vLLM times each token in the step
        that makes it: the TTFT of a request's first (``last`` None), else the gap since
        its last chunk. Returns ``now`` (the next chunk's ``last``)."""
        if last is None:
            self.ttft.labels(*self._values).observe(max(0.0, now - arrival))
        else:
            self.itl.labels(*self._values).observe(max(0.0, now - last))
        return now

    def collect(self) -> Iterator[Metric]:
        """Gauges and counters of the last stats (called by the registry)."""
        s, labels, values = self._stats, list(_LABELS), list(self._values)
        gauges = (
            ("vllm:num_requests_running", "Requests in model execution batches.", s.running),
            ("vllm:num_requests_waiting", "Requests waiting to be processed.", s.waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", s.kv_usage),
        )
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            gauge.add_metric(values, float(value))
            yield gauge
        counters = (
            ("vllm:prefix_cache_queries", "Prefix-cache queries, in tokens.",
             s.prefix_cache_queries_total),
            ("vllm:prefix_cache_hits", "Prefix-cache hits, in tokens.", s.prefix_cache_hits_total),
            ("vllm:num_preemptions", "Cumulative number of preemptions.", s.preemptions_total),
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens_total),
            ("vllm:generation_tokens", "Number of generation tokens processed.",
             s.generation_tokens_total),
        )  # fmt: skip
        for name, doc, value in counters:
            counter = CounterMetricFamily(name, doc, labels=labels)
            counter.add_metric(values, float(value))
            yield counter
        success = CounterMetricFamily(
            "vllm:request_success", "Successfully finished requests.",
            labels=[*labels, "finished_reason"],
        )  # fmt: skip
        for reason, count in sorted(self._finished.items()):
            success.add_metric([*values, reason], float(count))
        yield success
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig.",
            labels=["block_size", "num_gpu_blocks", "engine"],
        )  # fmt: skip
        if s.block_size is not None and s.num_gpu_blocks is not None:  # none: no KV cache
            info.add_metric([str(s.block_size), str(s.num_gpu_blocks), "0"], 1.0)
        yield info
        if s.max_lora:  # as vLLM with --enable-lora: its value is when it was set
            running, waiting = (",".join(sorted(names)) for names in self._lora)
            lora = GaugeMetricFamily(
                "vllm:lora_requests_info", "Running stats on lora requests.",
                labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            )  # fmt: skip
            lora.add_metric([str(s.max_lora), running, waiting], time.time())
            yield lora

    def render(
        self,
        stats: EngineStats,
        lora: tuple[frozenset[str], frozenset[str]] | None = None,
    ) -> bytes:
        """The exposition text, with gauges and counters taken from ``stats``, and
        ``vllm:lora_requests_info`` from ``lora`` (the adapters of the running and of the
        waiting requests) when ``stats.max_lora`` says the engine serves adapters (the
        adapters of ``stats.lora_adapters`` as running when ``lora`` is None)."""
        self._stats = stats
        self._lora = (stats.lora_adapters, frozenset()) if lora is None else lora
        return generate_latest(self.registry)


@runtime_checkable
class ReportsQueueTime(Protocol):
    """Optional engine extension: seconds a finished request waited before it was scheduled
    (``None`` when unknown). The server observes it as ``vllm:request_queue_time_seconds``."""

    def queue_time_s(self, request_id: str) -> float | None: ...


@runtime_checkable
class ReportsLoRARequests(Protocol):
    """Optional engine extension: the LoRA adapters of its running and of its waiting
    requests. The server exports them as ``vllm:lora_requests_info``."""

    def lora_requests(self) -> tuple[frozenset[str], frozenset[str]]: ...
