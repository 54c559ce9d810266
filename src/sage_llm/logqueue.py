"""Logging that never blocks the event loop.

``logging.basicConfig`` puts a ``StreamHandler`` on the root logger, which formats every
record and writes it to stderr in the thread that logged it. In the servers that thread
runs the event loop, and at the default level the gateway logs one access line per
request: one ``write`` syscall per line on the loop, and a stderr that stops draining (a
full pipe to a stalled log collector) stopped the whole gateway.

:func:`queued_logging` installs :class:`QueuedHandler` instead: a record is only merged
with its arguments (which may change after the call) and put on a queue. A
:class:`LogWriter` thread formats what has queued and writes it in one ``write`` per batch.
The queue is bounded (``capacity`` records): when the stream falls that far behind, new
records are dropped and counted, and the writer reports the count in a WARNING line once
it catches up, instead of the process growing without bound or stalling. On exit from
the context the writer writes what is queued and stops (waiting at most
``close_timeout_s`` for a stream that does not drain). Lines are :data:`LOG_FORMAT` text,
or JSON objects (:class:`JsonFormatter`, ``--log-format json``) that carry the fields
callers pass with ``extra=`` (the access line's request id, status, latency, …).

What it does not remove is the work of logging: the record is still made in the loop's
thread and formatted in the same process (the writer needs the GIL). At concurrency 1 an
access line costs the gateway about 50 µs either way; under load the batched writes gave
2–5% more requests per second at the default level (docs/benchmarks.md). Run with
``--log-level warning`` where the access log is not wanted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TextIO

from prometheus_client.core import CounterMetricFamily, Metric

__all__ = [
    "LOG_FORMAT",
    "LOG_FORMATS",
    "DroppedRecords",
    "JsonFormatter",
    "LogWriter",
    "QueuedHandler",
    "make_formatter",
    "parse_level",
    "queued_logging",
]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""The servers' log line format (what ``basicConfig`` was given before)."""

LOG_FORMATS = ("text", "json")
"""``--log-format`` values: :data:`LOG_FORMAT` lines, or one JSON object per line."""

_STANDARD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
"""A record's own attributes; any other was given by the caller (``extra=``)."""

_BATCH = 512
"""Records formatted and written per ``write`` call, at most."""

_STOP = None


def parse_level(level: str | int) -> int:
    """A level name (``"info"``, any case) or number as a ``logging`` level; ValueError
    names the known ones."""
    if isinstance(level, int):
        return level
    value = _LEVELS.get(level.strip().lower())
    if value is None:  # (Python's aliases warn, fatal and notset too)
        raise ValueError(f"unknown log level {level!r} (known: {', '.join(_LEVELS)})")
    return value


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
"""The level names ``--log-level`` takes (docs/gateway.md, Logs)."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record, for log pipelines: ``time`` (UTC, ISO 8601, ms),
    ``level``, ``logger``, ``message``, every field the caller passed with ``extra=``
    (the gateway's access line gives ``request_id``, ``method``, ``path``, ``status``,
    ``latency_ms`` and ``model``), and ``exception`` with the traceback when there is one.
    A value JSON cannot hold is written as its ``str``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC)
        out: dict[str, object] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_FIELDS and key not in out:
                out[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, default=str, ensure_ascii=False, separators=(",", ":"))


def make_formatter(fmt: str) -> logging.Formatter:
    """The formatter of a ``--log-format`` value; ValueError names the known ones."""
    if fmt == "text":
        return logging.Formatter(LOG_FORMAT)
    if fmt == "json":
        return JsonFormatter()
    raise ValueError(f"unknown log format {fmt!r} (known: {', '.join(LOG_FORMATS)})")


class LogWriter:
    """The thread that formats and writes queued records to ``stream``, a batch at a time.

    ``put`` is called by :class:`QueuedHandler` in the logging thread; everything else of a
    record (formatting, the write, the flush) happens in the writer's thread. A stream
    that raises on write (closed, broken pipe) is given up: later records are dropped
    and counted, as they are when the queue is full."""

    def __init__(
        self,
        stream: TextIO,
        formatter: logging.Formatter,
        *,
        capacity: int = 100_000,
        close_timeout_s: float = 2.0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.stream = stream
        self.formatter = formatter
        self.capacity = capacity
        self.close_timeout_s = close_timeout_s
        self._queue: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the counters (several threads may log)
        self._dropped = 0
        self._reported = 0
        self._broken = False
        self._thread = threading.Thread(target=self._run, name="sage-llm-log-writer", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Records dropped so far (queue full, or the stream broken)."""
        with self._lock:
            return self._dropped

    def put(self, record: logging.LogRecord) -> None:
        """Queue ``record`` for writing, or count it as dropped when ``capacity`` records
        are already waiting (or the stream is broken)."""
        if self._broken or self._queue.qsize() >= self.capacity:
            with self._lock:
                self._dropped += 1
            return
        self._queue.put(record)

    def close(self) -> None:
        """Write what is queued and stop the thread (waiting at most ``close_timeout_s``;
        the thread is a daemon, so a stream that never drains does not hold the process)."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(self.close_timeout_s)

    def _run(self) -> None:
        get, take = self._queue.get, self._queue.get_nowait
        while True:
            batch = [get()]
            while batch[-1] is not _STOP and len(batch) < _BATCH:
                try:
                    batch.append(take())
                except queue.Empty:
                    break
            stop = batch[-1] is _STOP
            self._write([r for r in batch if r is not None])
            if stop:
                return

    def _write(self, records: list[logging.LogRecord]) -> None:
        lines: list[str] = []
        note = self._drop_note()
        if note is not None:
            lines.append(note)
        for record in records:
            try:
                lines.append(self.formatter.format(record))
            except Exception as exc:  # a bad format string must not end the writer
                lines.append(f"(log record from {record.name} could not be formatted: {exc!r})")
        if self._broken:
            with self._lock:
                self._dropped += len(records)
            return
        if not lines:
            return
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing more can be written
            self._broken = True
            with self._lock:
                self._dropped += len(records)

    def _drop_note(self) -> str | None:
        """A WARNING line on the records dropped since the last note (None: none)."""
        with self._lock:
            new = self._dropped - self._reported
            self._reported = self._dropped
        if new <= 0:
            return None
        note = logging.LogRecord(
            "sage_llm.logging", logging.WARNING, __file__, 0,
            "%d log records were dropped: the log stream did not keep up "
            "(more than %d records waiting)", (new, self.capacity), None,
        )  # fmt: skip
        return self.formatter.format(note)


class QueuedHandler(logging.Handler):
    """Hands each record to a :class:`LogWriter`, after merging its message with its
    arguments (they may change once the call returns) and rendering an exception's
    traceback (its frames are gone by the time the writer formats it)."""

    def __init__(self, writer: LogWriter, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.args:
                record.msg = record.getMessage()
                record.args = None
            if record.exc_info and not record.exc_text:
                record.exc_text = self.writer.formatter.formatException(record.exc_info)
            self.writer.put(record)
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Nothing to do here: the writer writes and flushes each batch."""


class DroppedRecords:
    """A Prometheus collector of ``sage_llm_log_records_dropped_total``: the log records
    the queued handlers on ``logger`` (the root logger, where the CLI puts its handler)
    have dropped, their queue full or their stream broken, read at each scrape."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger

    def collect(self) -> Iterator[Metric]:
        logger = self._logger or logging.getLogger()
        dropped = sum(h.writer.dropped for h in logger.handlers if isinstance(h, QueuedHandler))
        family = CounterMetricFamily(
            "sage_llm_log_records_dropped",
            "Log records dropped: the log writer's queue full or its stream broken.",
        )
        family.add_metric([], float(dropped))
        yield family


@contextlib.contextmanager
def queued_logging(
    level: str | int,
    stream: TextIO | None = None,
    *,
    fmt: str = "text",
    logger: logging.Logger | None = None,
    capacity: int = 100_000,
    close_timeout_s: float = 2.0,
) -> Iterator[LogWriter | None]:
    """Log through a :class:`QueuedHandler` on ``logger`` (the root logger by default) at
    ``level``, to ``stream`` (stderr by default), in the format ``fmt`` (one of
    :data:`LOG_FORMATS`), for the duration of the context.

    As ``logging.basicConfig`` does, it only sets ``logger``'s level and installs nothing
    when ``logger`` already has handlers (under pytest, or when an application set up
    logging itself); it yields the writer, or None then. On exit the handler is removed
    and what was queued is written."""
    target = logging.getLogger() if logger is None else logger
    formatter = make_formatter(fmt)
    target.setLevel(parse_level(level))
    if target.handlers:
        yield None
        return
    writer = LogWriter(
        sys.stderr if stream is None else stream,
        formatter,
        capacity=capacity,
        close_timeout_s=close_timeout_s,
    )
    handler = QueuedHandler(writer)
    target.addHandler(handler)
    try:
        yield writer
    finally:
        target.removeHandler(handler)
        writer.close()
