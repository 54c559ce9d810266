"""A benchmark's child processes do not outlive it, however it dies (Linux)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[1][:1] != "Z"  # not a zombie


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_spawned_child_is_terminated_when_the_benchmark_dies(
    tmp_path: Path, how: signal.Signals
) -> None:
    """The parent spawns a long sleeper as the benchmarks spawn engines (its own session),
    prints its pid and is then killed: the sleeper goes too. Before, SIGTERM to a
    ``bench compare`` left its engines and gateway running, re-parented to init."""
    parent = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from sage_llm.bench.procs import spawn

        async def main() -> None:
            proc = await spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"],
                               port=0, log_path=Path({str(tmp_path / "log")!r}))
            print(proc.pid, flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            child = int(proc.stdout.readline())
            assert _alive(child)
            proc.send_signal(how)
            proc.wait(timeout=10)
            deadline = time.monotonic() + 10
            while _alive(child) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(child)
        finally:
            proc.kill()
