"""Child processes that do not outlive their parent (``sage_llm.orphans``)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from sage_llm.orphans import dies_with_parent


def test_elsewhere_argv_is_run_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert dies_with_parent(["engine", "--port", "1"]) == ["engine", "--port", "1"]


def test_the_wrapped_program_runs_with_its_arguments_and_status() -> None:
    async def main() -> tuple[int, bytes]:
        argv = dies_with_parent(
            [sys.executable, "-c", "import sys; print(sys.argv[1:]); sys.exit(3)", "a b", "c"]
        )
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        return proc.returncode or 0, out

    code, out = asyncio.run(main())
    assert (code, out.strip()) == (3, b"['a b', 'c']")


def test_a_program_that_is_not_there_is_left_to_fail_in_the_parent() -> None:
    assert dies_with_parent(["no-such-program-x", "-v"]) == ["no-such-program-x", "-v"]
    wrapped = dies_with_parent(["python3", "-V"], path="/usr/bin:/bin")
    assert wrapped[-2:] == ["/usr/bin/python3", "-V"] or wrapped[-2:] == ["/bin/python3", "-V"]
