"""Prometheus text exposition → :class:`EngineStats`.

:func:`parse_prometheus_text` is a small, strict parser of the Prometheus text format
(version 0.0.4, and the sample lines of OpenMetrics): comments, ``# HELP`` / ``# TYPE``,
labels with escaped quotes, backslashes and newlines, ``+Inf`` / ``-Inf`` / ``NaN``, optional
timestamps. Histogram and summary series stay under their own names (``x_bucket``,
``x_sum``, ``x_count``).

:func:`to_engine_stats` reads the load figures the control plane needs from vLLM
(``vllm:*``), SGLang (``sglang:*``) or llama.cpp (``llamacpp:*``) metric names, with the
fallbacks older releases need. Counts and counters are summed over label sets (vLLM labels
its series by ``model_name`` and ``engine``; data-parallel ranks add up); fractions such as
KV-cache usage are averaged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

from sage_llm.engines.base import EngineStats
from sage_llm.errors import EngineError

Sample = tuple[dict[str, str], float]
Samples = dict[str, list[Sample]]

_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_:")
_NAME_CHARS = _NAME_START | frozenset("0123456789")
_LABEL_START = _NAME_START - {":"}
_LABEL_CHARS = _LABEL_START | frozenset("0123456789")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}
_SPECIAL_VALUES = {
    **{f"{sign}{word}": math.inf for sign in ("", "+") for word in ("inf", "infinity")},
    "-inf": -math.inf,
    "-infinity": -math.inf,
    "nan": math.nan,
}
"""NaN and the infinities, in any case, as Prometheus and OpenMetrics write them."""


class MetricsParseError(EngineError):
    """The ``/metrics`` text is not valid Prometheus exposition; ``line`` is 1-based."""

    def __init__(self, message: str, *, line: int) -> None:
        super().__init__(f"line {line}: {message}", retryable=False)
        self.line = line


def parse_prometheus_text(text: str, names: frozenset[str] | None = None) -> Samples:
    """Every sample in ``text``: ``{metric_name: [(labels, value), ...]}`` in file order.

    With ``names``, only samples of those metric names are parsed (and checked); the other
    lines are skipped by their name alone, which is what keeps a scrape of a large
    ``/metrics`` page (vLLM's histograms run to hundreds of bucket lines) cheap.

    Raises :class:`MetricsParseError` (an :class:`~sage_llm.errors.EngineError`) on a
    malformed line.
    """
    out: Samples = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if names is not None and line[0] != "{" and _line_name(line) not in names:
            continue
        name, labels, value = _parse_sample(line, lineno)
        if names is None or name in names:
            out.setdefault(name, []).append((labels, value))
    return out


def _line_name(line: str) -> str:
    """The metric name a sample line starts with (up to ``{`` or white space)."""
    end = len(line)
    for stop in ("{", " ", "\t"):
        i = line.find(stop, 0, end)
        if i >= 0:
            end = i
    return line[:end]


def _parse_sample(line: str, lineno: int) -> tuple[str, dict[str, str], float]:
    pos = 0
    labels: dict[str, str] = {}
    name = ""
    if line[0] == "{":  # Prometheus 3 style: {"metric.name", label="v"}
        pos, labels, name = _parse_labels(line, 0, lineno, allow_bare_name=True)
        if not name:
            raise MetricsParseError("sample without a metric name", line=lineno)
    else:
        if line[0] not in _NAME_START:
            raise MetricsParseError(f"invalid metric name in {line!r}", line=lineno)
        while pos < len(line) and line[pos] in _NAME_CHARS:
            pos += 1
        name = line[:pos]
        if pos < len(line) and line[pos] == "{":
            pos, labels, _ = _parse_labels(line, pos, lineno, allow_bare_name=False)
    rest = line[pos:]
    if rest and not rest[0].isspace():
        raise MetricsParseError(f"unexpected {rest[0]!r} after {name!r}", line=lineno)
    fields = rest.split()
    if not fields:
        raise MetricsParseError(f"sample {name!r} has no value", line=lineno)
    value = _parse_value(fields[0], lineno)
    # After the value: an optional timestamp, then an optional OpenMetrics exemplar (" # ...").
    tail = fields[1:]
    if tail and tail[0] != "#":
        if not _is_timestamp(tail[0]):
            raise MetricsParseError(f"invalid timestamp {tail[0]!r}", line=lineno)
        tail = tail[1:]
    if tail and tail[0] != "#":
        raise MetricsParseError(f"trailing text after sample {name!r}", line=lineno)
    return name, labels, value


def _is_timestamp(token: str) -> bool:
    """A finite number: Prometheus' integer milliseconds, OpenMetrics' seconds as any real
    number (``1.7e9``, ``5.``, ``.5``)."""
    return _NUMBER.fullmatch(token) is not None and math.isfinite(float(token))


def _parse_value(token: str, lineno: int) -> float:
    special = _SPECIAL_VALUES.get(token.lower())
    if special is not None:
        return special
    if _NUMBER.fullmatch(token):  # (not float()'s "1_0" nor non-ASCII digits)
        return float(token)
    raise MetricsParseError(f"invalid sample value {token!r}", line=lineno)


_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
"""A sample value or timestamp as the text format writes it (besides NaN and the
infinities)."""


def _parse_labels(
    line: str, pos: int, lineno: int, *, allow_bare_name: bool
) -> tuple[int, dict[str, str], str]:
    """Parse ``{...}`` starting at ``line[pos] == "{"``; return (next pos, labels, name)."""
    labels: dict[str, str] = {}
    metric_name = ""
    pos += 1
    n = len(line)
    while True:
        while pos < n and line[pos] == " ":
            pos += 1
        if pos >= n:
            raise MetricsParseError("unterminated label set", line=lineno)
        if line[pos] == "}":
            return pos + 1, labels, metric_name
        if line[pos] == '"':
            key, pos = _parse_quoted(line, pos, lineno)
        elif line[pos] in _LABEL_START:
            start = pos
            while pos < n and line[pos] in _LABEL_CHARS:
                pos += 1
            key = line[start:pos]
        else:
            raise MetricsParseError(f"invalid label name at column {pos + 1}", line=lineno)
        while pos < n and line[pos] == " ":
            pos += 1
        if pos < n and line[pos] == "=":
            pos += 1
            while pos < n and line[pos] == " ":
                pos += 1
            if pos >= n or line[pos] != '"':
                raise MetricsParseError(f"label {key!r} value is not quoted", line=lineno)
            value, pos = _parse_quoted(line, pos, lineno)
            labels[key] = value
        elif allow_bare_name and not metric_name and not labels:
            metric_name = key
        else:
            raise MetricsParseError(f"label {key!r} has no value", line=lineno)
        while pos < n and line[pos] == " ":
            pos += 1
        if pos < n and line[pos] == ",":
            pos += 1
        elif pos < n and line[pos] != "}":
            raise MetricsParseError(f"expected ',' or '}}' at column {pos + 1}", line=lineno)


def _parse_quoted(line: str, pos: int, lineno: int) -> tuple[str, int]:
    """Parse a double-quoted string at ``line[pos] == '"'``; return (value, next pos)."""
    out: list[str] = []
    pos += 1
    n = len(line)
    while pos < n:
        ch = line[pos]
        if ch == '"':
            return "".join(out), pos + 1
        if ch == "\\":
            if pos + 1 >= n:
                break
            nxt = line[pos + 1]
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
            pos += 2
            continue
        out.append(ch)
        pos += 1
    raise MetricsParseError("unterminated quoted string", line=lineno)


# --- samples → EngineStats ---------------------------------------------------------------


def _values(samples: Mapping[str, Sequence[Sample]], *names: str) -> list[float] | None:
    """Finite values of the first name present in ``samples`` (None when none is)."""
    for name in names:
        series = samples.get(name)
        if series:
            return [v for _labels, v in series if math.isfinite(v)]
    return None


def _sum(samples: Mapping[str, Sequence[Sample]], *names: str) -> float | None:
    values = _values(samples, *names)
    return None if values is None else float(sum(values))


def _mean(samples: Mapping[str, Sequence[Sample]], *names: str) -> float | None:
    values = _values(samples, *names)
    if values is None:
        return None
    return sum(values) / len(values) if values else 0.0


def _int_label(series: Iterable[Sample], label: str) -> list[int]:
    out: list[int] = []
    for labels, _value in series:
        raw = labels.get(label)
        if raw is None:
            continue
        try:
            out.append(int(float(raw)))
        except ValueError:
            continue  # "None" before the engine has profiled its memory
    return out


def _fraction(value: float | None) -> float:
    if value is None:
        return 0.0
    return min(1.0, max(0.0, value))


def _vllm(samples: Samples) -> EngineStats:
    info = samples.get("vllm:cache_config_info", [])
    blocks = _int_label(info, "num_gpu_blocks")
    sizes = _int_label(info, "block_size")
    prompt = _sum(samples, "vllm:prompt_tokens_total", "vllm:prompt_tokens")
    generated = _sum(samples, "vllm:generation_tokens_total", "vllm:generation_tokens")
    slots, loaded = _lora(samples.get("vllm:lora_requests_info", []))
    return EngineStats(
        running=round(_sum(samples, "vllm:num_requests_running") or 0.0),
        waiting=round(_sum(samples, "vllm:num_requests_waiting") or 0.0),
        kv_usage=_fraction(_mean(samples, "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")),
        prefix_cache_queries_total=_sum(
            samples,
            "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_queries",
            "vllm:gpu_prefix_cache_queries_total",
            "vllm:gpu_prefix_cache_queries",
        )
        or 0.0,
        prefix_cache_hits_total=_sum(
            samples,
            "vllm:prefix_cache_hits_total",
            "vllm:prefix_cache_hits",
            "vllm:gpu_prefix_cache_hits_total",
            "vllm:gpu_prefix_cache_hits",
        )
        or 0.0,
        preemptions_total=_sum(samples, "vllm:num_preemptions_total", "vllm:num_preemptions")
        or 0.0,
        prompt_tokens_total=prompt or 0.0,
        generation_tokens_total=generated or 0.0,
        num_gpu_blocks=sum(blocks) if blocks else None,
        block_size=sizes[0] if sizes else None,
        source="vllm",
        counts_tokens=prompt is not None or generated is not None,
        max_lora=slots,
        lora_adapters=loaded,
    )


def _lora(series: Sequence[Sample]) -> tuple[int, frozenset[str]]:
    """``max_lora`` and ``lora_adapters`` of vLLM's ``vllm:lora_requests_info``: its
    latest series (its value is the time it was set, and the older ones stay exported),
    whose labels list the adapters of the running and of the waiting requests."""
    latest = max(series, key=lambda sample: sample[1], default=None)
    if latest is None:
        return 0, frozenset()
    labels = latest[0]
    try:
        slots = max(int(labels.get("max_lora", "0")), 0)
    except ValueError:
        return 0, frozenset()
    running, waiting = (labels.get(f"{k}_lora_adapters", "") for k in ("running", "waiting"))
    return slots, frozenset(n for n in f"{running},{waiting}".split(",") if n)


def _sglang(samples: Samples) -> EngineStats:
    counted = _sum(samples, "sglang:prompt_tokens_total", "sglang:prompt_tokens")
    generated = _sum(samples, "sglang:generation_tokens_total", "sglang:generation_tokens")
    prompt = counted or 0.0
    cached = _sum(samples, "sglang:cached_tokens_total", "sglang:cached_tokens")
    queries, hits = 0.0, 0.0
    if cached is not None and prompt > 0:
        queries, hits = prompt, cached
    else:
        rate = _mean(samples, "sglang:cache_hit_rate")
        if rate is not None:
            # Only a ratio is exposed: report it as hits per one query so that
            # EngineStats.prefix_hit_rate is right (the totals are not counts then).
            queries, hits = 1.0, _fraction(rate)
    capacity = _sum(samples, "sglang:max_total_num_tokens")
    return EngineStats(
        running=round(_sum(samples, "sglang:num_running_reqs") or 0.0),
        waiting=round(_sum(samples, "sglang:num_queue_reqs") or 0.0),
        kv_usage=_fraction(_mean(samples, "sglang:token_usage")),
        prefix_cache_queries_total=queries,
        prefix_cache_hits_total=hits,
        preemptions_total=_sum(samples, "sglang:num_retracted_reqs_total") or 0.0,
        prompt_tokens_total=prompt,
        generation_tokens_total=generated or 0.0,
        num_gpu_blocks=round(capacity) if capacity else None,
        block_size=1 if capacity else None,
        source="sglang",
        counts_tokens=counted is not None or generated is not None,
    )


def _llamacpp(samples: Samples) -> EngineStats:
    prompt = _sum(samples, "llamacpp:prompt_tokens_total")
    generated = _sum(samples, "llamacpp:tokens_predicted_total")  # (as requests end)
    steps = _sum(samples, "llamacpp:n_decode_total")  # (every decode step)
    return EngineStats(
        running=round(_sum(samples, "llamacpp:requests_processing") or 0.0),
        waiting=round(_sum(samples, "llamacpp:requests_deferred") or 0.0),
        kv_usage=_fraction(_mean(samples, "llamacpp:kv_cache_usage_ratio")),
        prompt_tokens_total=prompt or 0.0,
        generation_tokens_total=generated or 0.0,
        source="llamacpp",
        counts_tokens=prompt is not None or generated is not None or steps is not None,
        steps_total=steps or 0.0,
    )


def to_engine_stats(samples: Samples) -> EngineStats:
    """Load figures from parsed samples, by the first family present: vLLM, SGLang,
    llama.cpp. ``source`` names the family; ``"unknown"`` (all zeros) when none is."""
    prefixes = {name.split(":", 1)[0] for name in samples if ":" in name}
    if "vllm" in prefixes:
        return _vllm(samples)
    if "sglang" in prefixes:
        return _sglang(samples)
    if "llamacpp" in prefixes:
        return _llamacpp(samples)
    return EngineStats(source="unknown")


STATS_METRICS = frozenset(
    {
        # vLLM (current names, then older ones)
        "vllm:cache_config_info", "vllm:num_requests_running", "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
        "vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries",
        "vllm:gpu_prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries",
        "vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits",
        "vllm:gpu_prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits",
        "vllm:num_preemptions_total", "vllm:num_preemptions",
        "vllm:prompt_tokens_total", "vllm:prompt_tokens",
        "vllm:generation_tokens_total", "vllm:generation_tokens", "vllm:lora_requests_info",
        # SGLang
        "sglang:prompt_tokens_total", "sglang:prompt_tokens", "sglang:cached_tokens_total",
        "sglang:cached_tokens", "sglang:cache_hit_rate", "sglang:max_total_num_tokens",
        "sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage",
        "sglang:num_retracted_reqs_total", "sglang:generation_tokens_total",
        "sglang:generation_tokens",
        # llama.cpp
        "llamacpp:requests_processing", "llamacpp:requests_deferred",
        "llamacpp:kv_cache_usage_ratio", "llamacpp:prompt_tokens_total",
        "llamacpp:tokens_predicted_total", "llamacpp:n_decode_total",
    }
)  # fmt: skip
"""Every metric name :func:`to_engine_stats` reads."""


def scrape_text_to_stats(text: str) -> EngineStats:
    """``to_engine_stats`` of the samples in ``text`` that it reads (:data:`STATS_METRICS`);
    lines of other metrics are skipped unparsed."""
    return to_engine_stats(parse_prometheus_text(text, STATS_METRICS))
