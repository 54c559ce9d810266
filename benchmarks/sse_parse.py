"""What parsing one engine stream costs the gateway: SSE decoding, then chunks.

Every streamed engine call (streamed requests, and with the default ``engine_stream`` a
sample of the others; every request with ``always``) passes its answer through
:class:`~sage_llm.engines.sse.SSEDecoder` and
:class:`~sage_llm.engines.sse.StreamAssembler`. This script times both on a typical
vLLM completion stream (4 tokens, a usage event, ``[DONE]``: 6 events), fed in one
piece, and prints µs per stream (best of 5 repeats). ``--baseline-src DIR`` times another
checkout's ``src`` the same way in a child process, alternately with this one, and
prints the ratios. Run from the repository root::

    .venv/bin/python benchmarks/sse_parse.py
    git worktree add /tmp/base <commit>
    .venv/bin/python benchmarks/sse_parse.py --baseline-src /tmp/base/src
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import timeit
from collections.abc import Callable
from pathlib import Path


def _stream() -> list[str]:
    """The ``data`` of each event of a 4-token vLLM completion stream with usage."""
    head = {"id": "cmpl-abc", "object": "text_completion", "created": 1, "model": "llama-3-8b"}
    events = []
    for i in range(4):
        choice = {"index": 0, "text": f" w{i}", "logprobs": None,
                  "finish_reason": None if i < 3 else "length", "stop_reason": None}  # fmt: skip
        events.append(json.dumps({**head, "choices": [choice]}, separators=(",", ":")))
    usage = {"prompt_tokens": 13, "total_tokens": 17, "completion_tokens": 4}
    events.append(json.dumps({**head, "choices": [], "usage": usage}, separators=(",", ":")))
    events.append("[DONE]")
    return events


def measure(number: int = 20_000) -> dict[str, float]:
    """µs per stream of decoding and of assembling (best of 5), in this process."""
    from sage_llm.engines.base import EngineRequest
    from sage_llm.engines.sse import SSEDecoder, StreamAssembler

    events = _stream()
    raw = "".join(f"data: {e}\n\n" for e in events).encode()
    req = EngineRequest(request_id="r", model="llama-3-8b", prompt="a b c")

    def decode() -> None:
        decoder = SSEDecoder()
        assert len(decoder.feed(raw) + decoder.close()) == 6

    def assemble() -> None:
        asm = StreamAssembler(req, "i0")
        chunks = [c for e in events for c in asm.on_event(e)] + asm.finish()
        assert len(chunks) == 4
        assert chunks[-1].usage is not None

    def best(fn: Callable[[], None]) -> float:
        return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6

    return {"decode": best(decode), "assemble": best(assemble)}


def _child(src: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, check=True
    )
    return {k: float(v) for k, v in json.loads(out.stdout).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-src", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure()))
        return 0
    here = Path(__file__).resolve().parents[1] / "src"
    if args.baseline_src is None:
        for name, us in _child(here).items():
            print(f"{name:<9} {us:6.2f} µs per 6-event stream")
        return 0
    if not (args.baseline_src / "sage_llm").is_dir():
        parser.error(f"--baseline-src {args.baseline_src}: no sage_llm package in it")
    runs = [(_child(args.baseline_src.resolve()), _child(here)) for _ in range(3)]
    print(f"{'':<9} {'baseline':>9} {'this':>9} {'ratio':>7}   (µs per 6-event stream, best of 3)")
    for name in ("decode", "assemble"):
        base = min(b[name] for b, _ in runs)
        this = min(t[name] for _, t in runs)
        print(f"{name:<9} {base:9.2f} {this:9.2f} {this / base:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
