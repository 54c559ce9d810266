"""Prometheus text parsing and engine-stats extraction (vLLM, SGLang, llama.cpp names)."""

from __future__ import annotations

import math
import re

import pytest

from sage_llm.engines.metrics_scrape import (
    MetricsParseError,
    parse_prometheus_text,
    scrape_text_to_stats,
    to_engine_stats,
)
from sage_llm.errors import EngineError

# Two data-parallel engines of one vLLM server, current metric names.
VLLM_TEXT = r"""
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B"} 3.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B"} 4.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B"} 0.25
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 1000.0
vllm:prefix_cache_queries_total{engine="1",model_name="meta-llama/Llama-3.1-8B"} 1000.0
vllm:prefix_cache_queries_created{engine="0",model_name="meta-llama/Llama-3.1-8B"} 1.7e9
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 600.0
vllm:prefix_cache_hits_total{engine="1",model_name="meta-llama/Llama-3.1-8B"} 200.0
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 7.0
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 12345.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 678.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 5.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 5.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 1.25
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="29205"} 1.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="1",num_gpu_blocks="29205"} 1.0
"""

# An older vLLM: gpu_cache_usage_perc, counters without the _total suffix.
VLLM_OLD_TEXT = """
vllm:num_requests_running{model_name="m"} 1
vllm:num_requests_waiting{model_name="m"} 2
vllm:gpu_cache_usage_perc{model_name="m"} 0.75
vllm:gpu_prefix_cache_queries{model_name="m"} 40
vllm:gpu_prefix_cache_hits{model_name="m"} 10
vllm:num_preemptions{model_name="m"} 3
vllm:prompt_tokens{model_name="m"} 100
vllm:generation_tokens{model_name="m"} 50
vllm:cache_config_info{block_size="32",num_gpu_blocks="None"} 1
"""

SGLANG_TEXT = """
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen",engine_type="unified",tp_rank="0"} 6.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="qwen",engine_type="unified",tp_rank="0"} 1.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="qwen",engine_type="unified",tp_rank="0"} 0.42
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{model_name="qwen",engine_type="unified",tp_rank="0"} 0.3
sglang:prompt_tokens_total{model_name="qwen"} 900.0
sglang:generation_tokens_total{model_name="qwen"} 300.0
sglang:max_total_num_tokens{model_name="qwen"} 500000.0
"""

LLAMACPP_TEXT = """
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 2048
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 512
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.125
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 5
# HELP llamacpp:n_decode_total Total number of llama_decode() calls
# TYPE llamacpp:n_decode_total counter
llamacpp:n_decode_total 300
"""


def test_parse_labels_with_escapes_and_special_values() -> None:
    text = "\n".join(
        [
            "# a comment",
            r'm{path="C:\\dir",quote="say \"hi\"",nl="a\nb",} 1.5 1700000000000',
            "m{} +Inf",
            "neg -Inf",
            "nan_metric NaN",
            "sci 1.5e-3",
            "",
        ]
    )
    samples = parse_prometheus_text(text)
    labels, value = samples["m"][0]
    assert labels == {"path": "C:\\dir", "quote": 'say "hi"', "nl": "a\nb"}
    assert value == 1.5
    assert samples["m"][1] == ({}, math.inf)
    assert samples["neg"][0][1] == -math.inf
    assert math.isnan(samples["nan_metric"][0][1])
    assert samples["sci"][0][1] == pytest.approx(0.0015)


def test_parse_histogram_series_and_label_sets() -> None:
    samples = parse_prometheus_text(VLLM_TEXT)
    buckets = samples["vllm:time_to_first_token_seconds_bucket"]
    assert [(lb["le"], v) for lb, v in buckets] == [("0.1", 2.0), ("+Inf", 5.0)]
    assert samples["vllm:time_to_first_token_seconds_count"][0][1] == 5.0
    assert samples["vllm:time_to_first_token_seconds_sum"][0][1] == 1.25
    assert len(samples["vllm:num_requests_running"]) == 2


def test_parse_openmetrics_exemplar_and_quoted_names() -> None:
    text = "\n".join(
        [
            'h_bucket{le="1"} 3 # {trace_id="abc"} 0.5',
            '{"my.metric", env="prod"} 4',
            "# EOF",
        ]
    )
    samples = parse_prometheus_text(text)
    assert samples["h_bucket"] == [({"le": "1"}, 3.0)]
    assert samples["my.metric"] == [({"env": "prod"}, 4.0)]


@pytest.mark.parametrize(
    "line",
    [
        "9bad 1",
        'm{a="1" 2',
        "m{a=1} 2",
        'm{a="unterminated} 2',
        "m",
        "m abc",
        "m 1 2 3",
        "m{a} 1",
    ],
)
def test_malformed_lines_raise_typed_error(line: str) -> None:
    with pytest.raises(MetricsParseError, match="line 2") as info:
        parse_prometheus_text("ok 1\n" + line)
    assert isinstance(info.value, EngineError)
    assert info.value.line == 2


def test_vllm_stats_sum_counts_and_average_fractions() -> None:
    stats = scrape_text_to_stats(VLLM_TEXT)
    assert stats.source == "vllm"
    assert (stats.running, stats.waiting) == (5, 4)
    assert stats.kv_usage == pytest.approx(0.375)
    assert (stats.prefix_cache_queries_total, stats.prefix_cache_hits_total) == (2000.0, 800.0)
    assert stats.prefix_hit_rate == pytest.approx(0.4)
    assert stats.preemptions_total == 7.0
    assert (stats.prompt_tokens_total, stats.generation_tokens_total) == (12345.0, 678.0)
    assert (stats.num_gpu_blocks, stats.block_size) == (58410, 16)


def test_vllm_lora_slots_are_its_latest_lora_requests_info() -> None:
    """vLLM keeps every label set of ``vllm:lora_requests_info`` it ever set, each valued
    with the time it was set: the latest says which adapters its requests use now."""
    text = (
        VLLM_TEXT
        + "# TYPE vllm:lora_requests_info gauge\n"
        + 'vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql,chat",'
        + 'waiting_lora_adapters="sql"} 1.7963545357e+09\n'
        + 'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",'
        + 'waiting_lora_adapters=""} 1.7963545358e+09\n'
        + 'vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql",'
        + 'waiting_lora_adapters="chat"} 1.7963545359e+09\n'
    )
    stats = scrape_text_to_stats(text)
    assert (stats.max_lora, stats.lora_adapters) == (2, frozenset({"sql", "chat"}))
    assert stats.lora_room("sql") and not stats.lora_room("code")
    idle = scrape_text_to_stats(text.replace("1.7963545359e+09", "1.0"))
    assert (idle.max_lora, idle.lora_adapters) == (2, frozenset())
    assert idle.lora_room("code")
    plain = scrape_text_to_stats(VLLM_TEXT)  # no LoRA: nothing said, room for any
    assert (plain.max_lora, plain.lora_adapters) == (0, frozenset())
    assert plain.lora_room("code")


def test_vllm_older_names_fall_back() -> None:
    stats = scrape_text_to_stats(VLLM_OLD_TEXT)
    assert (stats.running, stats.waiting) == (1, 2)
    assert stats.kv_usage == 0.75
    assert (stats.prefix_cache_queries_total, stats.prefix_cache_hits_total) == (40.0, 10.0)
    assert stats.preemptions_total == 3.0
    assert (stats.prompt_tokens_total, stats.generation_tokens_total) == (100.0, 50.0)
    assert (stats.num_gpu_blocks, stats.block_size) == (None, 32)


def test_kv_cache_usage_perc_preferred_over_old_name() -> None:
    text = 'vllm:kv_cache_usage_perc{e="0"} 0.1\nvllm:gpu_cache_usage_perc{e="0"} 0.9\n'
    assert scrape_text_to_stats(text).kv_usage == pytest.approx(0.1)


def test_sglang_stats() -> None:
    stats = scrape_text_to_stats(SGLANG_TEXT)
    assert stats.source == "sglang"
    assert (stats.running, stats.waiting) == (6, 1)
    assert stats.kv_usage == pytest.approx(0.42)
    assert stats.prefix_hit_rate == pytest.approx(0.3)
    assert (stats.prompt_tokens_total, stats.generation_tokens_total) == (900.0, 300.0)
    assert (stats.num_gpu_blocks, stats.block_size) == (500000, 1)


def test_sglang_cached_tokens_counter_gives_real_totals() -> None:
    text = SGLANG_TEXT + 'sglang:cached_tokens_total{model_name="qwen"} 450.0\n'
    stats = scrape_text_to_stats(text)
    assert (stats.prefix_cache_queries_total, stats.prefix_cache_hits_total) == (900.0, 450.0)


def test_llamacpp_stats() -> None:
    stats = scrape_text_to_stats(LLAMACPP_TEXT)
    assert stats.source == "llamacpp"
    assert (stats.running, stats.waiting) == (2, 5)
    assert stats.kv_usage == pytest.approx(0.125)
    assert (stats.prompt_tokens_total, stats.generation_tokens_total) == (2048.0, 512.0)
    assert stats.steps_total == 300.0 and stats.counts_tokens  # its progress between ends


def test_unknown_family_and_nan_values() -> None:
    assert to_engine_stats(parse_prometheus_text("process_cpu_seconds_total 3\n")).source == (
        "unknown"
    )
    stats = scrape_text_to_stats("vllm:num_requests_running NaN\nvllm:kv_cache_usage_perc 7\n")
    assert (stats.running, stats.kv_usage) == (0, 1.0)


@pytest.mark.parametrize("text", [VLLM_TEXT, VLLM_OLD_TEXT, SGLANG_TEXT, LLAMACPP_TEXT])
def test_token_counters_are_reported_as_counted_only_when_present(text: str) -> None:
    """A stall (token counters standing still) can be judged only on counters the engine
    exports: ``counts_tokens`` says they were there, not zeros filled in."""
    assert scrape_text_to_stats(text).counts_tokens
    counters = ("tokens", "predicted", "n_decode")  # (llama.cpp's decode calls count too)
    kept = "\n".join(line for line in text.splitlines() if not any(c in line for c in counters))
    stats = scrape_text_to_stats(kept)
    assert not stats.counts_tokens
    assert (stats.prompt_tokens_total, stats.generation_tokens_total) == (0.0, 0.0)


def test_stats_scrape_parses_only_the_metrics_it_reads() -> None:
    noise = "\n".join(
        f'vllm:e2e_request_latency_seconds_bucket{{le="{i}",model_name="m"}} {i}'
        for i in range(500)
    )
    broken = 'vllm:some_future_metric{label="unterminated 1\n'
    text = VLLM_TEXT + noise + "\n" + broken
    with pytest.raises(MetricsParseError):
        parse_prometheus_text(text)  # the full parser checks every line
    assert scrape_text_to_stats(text) == scrape_text_to_stats(VLLM_TEXT)
    wanted = parse_prometheus_text(text, frozenset({"vllm:num_requests_running"}))
    assert list(wanted) == ["vllm:num_requests_running"]
    assert len(wanted["vllm:num_requests_running"]) == 2


def test_a_malformed_line_of_a_metric_the_stats_read_still_raises() -> None:
    with pytest.raises(MetricsParseError, match="line 2"):
        scrape_text_to_stats('ok 1\nvllm:num_requests_running{engine="0" 3\n')


def test_a_bad_timestamp_is_reported_as_a_timestamp() -> None:
    with pytest.raises(MetricsParseError, match="invalid timestamp 'notatimestamp'"):
        parse_prometheus_text("vllm:num_requests_running 3 notatimestamp\n")
    assert parse_prometheus_text("vllm:num_requests_running 3 1712000000000\n") == {
        "vllm:num_requests_running": [({}, 3.0)]
    }


@pytest.mark.parametrize("timestamp", ["NaN", "+Inf", "1e999", "1_000", "\u0661\u0662"])
def test_a_timestamp_is_a_finite_number_of_ascii_digits(timestamp: str) -> None:
    with pytest.raises(MetricsParseError, match="invalid timestamp"):
        parse_prometheus_text(f"a 1 {timestamp}\n")
    assert parse_prometheus_text("a 1 1712000000.125\n") == {"a": [({}, 1.0)]}  # seconds


@pytest.mark.parametrize("timestamp", ["1.7e9", "1712000000.", ".5", "-1", "+1712000000000"])
def test_a_timestamp_is_any_real_number_openmetrics_writes(timestamp: str) -> None:
    """OpenMetrics' ``timestamp = realnumber`` (seconds, with a fraction or an exponent)."""
    text = f'vllm:num_requests_running{{model_name="m"}} 3 {timestamp}\n'
    assert parse_prometheus_text(text) == {
        "vllm:num_requests_running": [({"model_name": "m"}, 3.0)]
    }


@pytest.mark.parametrize("value", ["1_0", "\u0661", "0x10"])
def test_a_sample_value_is_written_in_ascii_digits(value: str) -> None:
    """As Prometheus reads a value (not float()'s underscores or other scripts' digits);
    NaN and the infinities are values."""
    with pytest.raises(MetricsParseError, match="invalid sample value"):
        parse_prometheus_text(f"a {value}\n")
    assert parse_prometheus_text("a +Inf\nb NaN\nc -3e2\n")["c"] == [({}, -300.0)]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("Infinity", math.inf), ("+infinity", math.inf), ("-Infinity", -math.inf), ("inf", math.inf)],
)
def test_the_infinities_are_read_as_go_and_openmetrics_write_them(
    value: str, expected: float
) -> None:
    assert parse_prometheus_text(f"a {value}\n") == {"a": [({}, expected)]}


def test_a_label_name_may_not_contain_a_colon() -> None:
    with pytest.raises(MetricsParseError, match="line 1"):
        parse_prometheus_text('vllm:num_requests_running{model:name="x"} 3\n')


def test_a_name_filter_drops_quoted_name_samples_of_other_metrics() -> None:
    text = '{"http.server.duration", le="1"} 5\nvllm:num_requests_running 3\n'
    wanted = parse_prometheus_text(text, frozenset({"vllm:num_requests_running"}))
    assert wanted == {"vllm:num_requests_running": [({}, 3.0)]}


def test_vllm_names_win_over_sglang_names_on_one_page() -> None:
    stats = scrape_text_to_stats("vllm:num_requests_running 3\nsglang:num_running_reqs 9\n")
    assert (stats.source, stats.running) == ("vllm", 3)


def test_one_vllm_token_counter_is_enough_to_count_tokens() -> None:
    stats = scrape_text_to_stats("vllm:prompt_tokens_total 120\n")
    assert (stats.prompt_tokens_total, stats.counts_tokens) == (120.0, True)


def test_sglang_cache_hit_rate_above_one_is_clamped() -> None:
    stats = scrape_text_to_stats("sglang:cache_hit_rate 1.5\nsglang:num_running_reqs 1\n")
    assert (stats.prefix_cache_queries_total, stats.prefix_cache_hits_total) == (1.0, 1.0)
    assert stats.prefix_hit_rate == 1.0


def test_infinite_values_are_dropped_like_nan() -> None:
    text = (
        'vllm:num_requests_running{engine="0"} 2\n'
        'vllm:num_requests_waiting{engine="0"} +Inf\n'
        'vllm:kv_cache_usage_perc{engine="0"} 0.5\n'
        'vllm:kv_cache_usage_perc{engine="1"} -Inf\n'
    )
    stats = scrape_text_to_stats(text)
    assert (stats.running, stats.waiting, stats.kv_usage) == (2, 0, 0.5)


def test_sglang_preemptions_are_its_retracted_requests() -> None:
    stats = scrape_text_to_stats(SGLANG_TEXT + 'sglang:num_retracted_reqs_total{tp_rank="0"} 7\n')
    assert stats.preemptions_total == 7.0


def test_sglang_with_no_prompt_tokens_counted_yet_uses_its_cache_hit_rate() -> None:
    text = (
        "sglang:num_running_reqs 1\nsglang:prompt_tokens_total 0\n"
        "sglang:cached_tokens_total 0\nsglang:cache_hit_rate 0.4\n"
    )
    stats = scrape_text_to_stats(text)
    assert (stats.prefix_cache_queries_total, stats.prefix_cache_hits_total) == (1.0, 0.4)


def test_every_count_is_summed_over_its_label_sets() -> None:
    """Data-parallel ranks add up: running and waiting of each engine label, not one."""
    text = (
        'vllm:num_requests_running{engine="0"} 1\nvllm:num_requests_running{engine="1"} 2\n'
        'vllm:num_requests_waiting{engine="0"} 0\nvllm:num_requests_waiting{engine="1"} 5\n'
    )
    stats = scrape_text_to_stats(text)
    assert (stats.running, stats.waiting) == (3, 5)


def test_llamacpp_decode_calls_alone_count_tokens() -> None:
    """The stall check reads llama.cpp's decode calls with its token counters: a page with
    only ``llamacpp:n_decode_total`` is judged."""
    stats = scrape_text_to_stats("llamacpp:requests_processing 1\nllamacpp:n_decode_total 9\n")
    assert (stats.counts_tokens, stats.steps_total) == (True, 9.0)


def test_a_fraction_below_zero_is_clamped_to_zero() -> None:
    assert scrape_text_to_stats("vllm:kv_cache_usage_perc -0.25\n").kv_usage == 0.0


def test_tab_separated_samples_and_comments_without_a_space_are_read() -> None:
    """The text format separates a sample's tokens by blanks or tabs, and any line whose
    first character is ``#`` is a comment."""
    text = "#TYPE vllm:num_requests_running gauge\nvllm:num_requests_running\t4\n"
    assert parse_prometheus_text(text) == {"vllm:num_requests_running": [({}, 4.0)]}
    assert scrape_text_to_stats(text).running == 4


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{env="prod"} 1', "sample without a metric name"),
        ('m{a="1"}x 1', "unexpected 'x' after 'm'"),
        ('m{a="1",', "unterminated label set"),
        ('m{,a="1"} 1', "invalid label name at column 3"),
        ('m{a="x' + "\\", "unterminated quoted string"),  # a backslash escaping nothing
    ],
)
def test_a_malformed_line_is_reported_by_what_is_wrong_in_it(line: str, message: str) -> None:
    with pytest.raises(MetricsParseError, match=f"line 2: {re.escape(message)}"):
        parse_prometheus_text("ok 1\n" + line)


def test_blanks_around_a_labels_equals_sign_are_read() -> None:
    assert parse_prometheus_text('m{a ="1",b= "2"} 3\n') == {"m": [({"a": "1", "b": "2"}, 3.0)]}


def test_a_cache_config_without_its_block_count_leaves_the_count_unknown() -> None:
    stats = scrape_text_to_stats('vllm:cache_config_info{block_size="16"} 1\n')
    assert (stats.num_gpu_blocks, stats.block_size) == (None, 16)
