"""Logging through a writer thread (sage_llm.logqueue): what the servers' event loops log
is formatted and written elsewhere, and a stream that stops draining stalls nothing."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import threading
import time
import uuid

import pytest
from prometheus_client import CollectorRegistry

from sage_llm.logqueue import (
    LOG_FORMAT,
    DroppedRecords,
    JsonFormatter,
    LogWriter,
    QueuedHandler,
    make_formatter,
    parse_level,
    queued_logging,
)


def _fresh_logger() -> logging.Logger:
    logger = logging.getLogger(f"test.logqueue.{uuid.uuid4().hex}")
    logger.propagate = False
    return logger


class _GatedStream(io.StringIO):
    """A stream whose writes wait until ``gate`` is set (a pipe nobody reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()

    def write(self, s: str) -> int:
        self.entered.set()
        self.gate.wait(10)
        return super().write(s)


class _BrokenStream(io.StringIO):
    def write(self, s: str) -> int:
        raise BrokenPipeError("stderr went away")


def test_lines_are_formatted_and_written_and_flushed_on_exit() -> None:
    logger, out = _fresh_logger(), io.StringIO()
    with queued_logging("info", out, logger=logger) as writer:
        assert writer is not None
        logger.info("request %s took %.1f ms", "r1", 1.25)
        logger.debug("not at this level")
        logger.warning("plain message")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(f"INFO {logger.name}: request r1 took 1.2 ms")
    assert lines[1].endswith(f"WARNING {logger.name}: plain message")
    assert logger.handlers == []  # removed on exit


def test_arguments_are_merged_when_logged_not_when_written() -> None:
    logger, out = _fresh_logger(), _GatedStream()
    with queued_logging("info", out, logger=logger):
        logger.info("first")  # the writer blocks on this one
        assert out.entered.wait(5)
        state = {"n": 1}
        logger.info("state %s", state)
        state["n"] = 2  # changed after the call: the line shows the value at the call
        out.gate.set()
    assert "state {'n': 1}" in out.getvalue()


def test_an_exception_is_rendered_with_its_traceback() -> None:
    logger, out = _fresh_logger(), io.StringIO()
    with queued_logging("info", out, logger=logger):
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("handler failed")
    text = out.getvalue()
    assert "ERROR" in text and "handler failed" in text
    assert "Traceback (most recent call last)" in text and "ValueError: boom" in text


def test_a_stalled_stream_blocks_no_caller_and_drops_beyond_capacity() -> None:
    logger, out = _fresh_logger(), _GatedStream()
    with queued_logging("info", out, logger=logger, capacity=10) as writer:
        assert writer is not None
        logger.info("line 0")
        assert out.entered.wait(5)  # the writer thread is stuck in write()
        started = time.perf_counter()
        for i in range(1, 31):
            logger.info("line %d", i)
        assert time.perf_counter() - started < 1.0  # the callers never waited
        assert writer.dropped == 20  # 10 queued behind the stuck write, 20 dropped
        out.gate.set()
        registry = CollectorRegistry()
        registry.register(DroppedRecords(logger))
        assert registry.get_sample_value("sage_llm_log_records_dropped_total") == 20.0
    text = out.getvalue()
    for i in range(11):
        assert f"line {i}\n" in text
    assert "line 11\n" not in text
    assert "WARNING sage_llm.logging: 20 log records were dropped" in text
    assert "(more than 10 records waiting)" in text


def test_a_broken_stream_is_given_up_quietly() -> None:
    logger = _fresh_logger()
    with queued_logging("info", _BrokenStream(), logger=logger) as writer:
        assert writer is not None
        logger.info("lost")
        deadline = time.monotonic() + 5
        while writer.dropped < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        logger.info("lost too")
    assert writer.dropped == 2


def test_a_record_that_cannot_be_formatted_does_not_stop_the_writer() -> None:
    logger, out = _fresh_logger(), io.StringIO()

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    with queued_logging("info", out, logger=logger):
        logger.info(Unprintable())  # no arguments: its text is made by the writer
        logger.info("next line")
    text = out.getvalue()
    assert f"(log record from {logger.name} could not be formatted: " in text
    assert "RuntimeError('no text'))" in text
    assert text.endswith("next line\n")


def test_nothing_is_installed_when_the_logger_already_has_handlers() -> None:
    logger, kept = _fresh_logger(), logging.NullHandler()
    logger.addHandler(kept)
    with queued_logging("warning", io.StringIO(), logger=logger) as writer:
        assert writer is None
        assert logger.handlers == [kept]
        assert logger.level == logging.WARNING


def test_levels_by_name_or_number_and_unknown_names() -> None:
    assert parse_level("info") == logging.INFO
    assert parse_level("WARNING") == logging.WARNING
    assert parse_level(logging.DEBUG) == logging.DEBUG
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        parse_level("loud")
    for alias in ("warn", "FATAL", "notset"):  # Python's aliases: not the documented names
        with pytest.raises(ValueError, match=r"\(known: debug, info, warning, error, critical\)"):
            parse_level(alias)
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        LogWriter(io.StringIO(), logging.Formatter(), capacity=0)


def test_the_handler_passes_records_to_its_writer() -> None:
    out = io.StringIO()
    writer = LogWriter(out, logging.Formatter("%(levelname)s %(message)s"))
    handler = QueuedHandler(writer)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "a=%s", ("b",), None)
    handler.handle(record)
    handler.flush()
    writer.close()
    assert out.getvalue() == "INFO a=b\n"


def test_json_lines_carry_the_callers_fields_and_the_traceback() -> None:
    logger, out = _fresh_logger(), io.StringIO()

    class Opaque:
        def __str__(self) -> str:
            return "opaque-value"

    with queued_logging("info", out, fmt="json", logger=logger):
        logger.info("request_id=%s status=%d", "r1", 200, extra={"request_id": "r1", "status": 200})
        logger.warning("odd value", extra={"thing": Opaque()})
        try:
            raise KeyError("k")
        except KeyError:
            logger.exception("failed")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["level"] for line in lines] == ["INFO", "WARNING", "ERROR"]
    first = lines[0]
    assert first["logger"] == logger.name and first["message"] == "request_id=r1 status=200"
    assert (first["request_id"], first["status"]) == ("r1", 200)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert set(first) == {"time", "level", "logger", "message", "request_id", "status"}
    assert lines[1]["thing"] == "opaque-value"
    assert "KeyError: 'k'" in lines[2]["exception"]


def test_log_formats_by_name() -> None:
    assert isinstance(make_formatter("json"), JsonFormatter)
    assert make_formatter("text")._fmt == LOG_FORMAT
    with pytest.raises(ValueError, match="unknown log format 'xml' \\(known: text, json\\)"):
        make_formatter("xml")
    logs = queued_logging("info", io.StringIO(), fmt="xml", logger=_fresh_logger())
    with pytest.raises(ValueError, match="unknown log format"), logs:
        pass


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["engine-sim", "--log-level", "loud"], "error: --log-level: unknown log level 'loud'"),
        (
            ["serve", "--log-format", "xml"],
            "error: --log-format: unknown log format 'xml' (known: text, json)",
        ),
    ],
)
def test_the_cli_rejects_an_unknown_log_level_or_format(argv: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sage_llm.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert message in proc.stderr


class _BreaksWhenOpened(_GatedStream):
    """A pipe that breaks on its first write, once ``gate`` is set."""

    def write(self, s: str) -> int:
        self.entered.set()
        self.gate.wait(10)
        raise BrokenPipeError("stderr went away")


def test_records_queued_when_the_stream_breaks_are_counted_as_dropped() -> None:
    logger, out = _fresh_logger(), _BreaksWhenOpened()
    with queued_logging("info", out, logger=logger) as writer:
        assert writer is not None
        logger.info("first")  # the writer is in write(): the pipe is about to break
        assert out.entered.wait(5)
        for i in range(10):
            logger.info("queued %d", i)  # behind it
        out.gate.set()
    assert writer.dropped == 11


def test_dropped_records_are_noted_once_per_burst() -> None:
    logger, out = _fresh_logger(), _GatedStream()
    with queued_logging("info", out, logger=logger, capacity=2) as writer:
        assert writer is not None
        logger.info("first")
        assert out.entered.wait(5)  # stuck: the burst beyond its capacity is dropped
        for i in range(10):
            logger.info("burst %d", i)
        out.gate.set()
        for i in range(3):  # later records, each written on its own: no new note
            logger.info("later %d", i)
            deadline = time.monotonic() + 5
            while f"later {i}\n" not in out.getvalue() and time.monotonic() < deadline:
                time.sleep(0.01)
    notes = [line for line in out.getvalue().splitlines() if "were dropped" in line]
    assert len(notes) == 1 and f"{writer.dropped} log records were dropped" in notes[0], notes


def test_json_lines_keep_their_own_level_and_logger_over_extra_fields() -> None:
    logger, out = _fresh_logger(), io.StringIO()
    with queued_logging("info", out, fmt="json", logger=logger):
        logger.warning("disk almost full", extra={"level": "debug", "logger": "spoofed"})
    record = json.loads(out.getvalue().splitlines()[0])
    assert (record["level"], record["logger"]) == ("WARNING", logger.name)


def test_the_json_formatter_on_a_plain_handler_renders_the_traceback_and_the_stack() -> None:
    logger, out = _fresh_logger(), io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    try:
        raise KeyError("k")
    except KeyError:
        logger.exception("failed")
    logger.warning("where", stack_info=True)
    failed, where = (json.loads(line) for line in out.getvalue().splitlines())
    assert "KeyError: 'k'" in failed["exception"] and "stack" not in failed
    assert where["stack"].startswith("Stack (most recent call last):")
    assert "exception" not in where


def test_a_record_whose_arguments_do_not_fit_its_message_is_reported_not_raised(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = io.StringIO()
    writer = LogWriter(out, logging.Formatter("%(message)s"))
    handler = QueuedHandler(writer)
    logger = _fresh_logger()
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.info("count=%d", "many")  # the caller goes on
    logger.info("after")
    writer.close()
    assert out.getvalue() == "after\n"
    assert "--- Logging error ---" in capsys.readouterr().err
