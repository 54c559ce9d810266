"""An engine that answers at once: for measuring what a proxy adds, not for simulating.

:class:`InstantEngine` produces ``max_tokens`` tokens the moment a request arrives, with no
simulated time, batching or step loop. Served over vLLM's HTTP API (``sage-llm
engine-sim --instant``), a request costs the server only its HTTP handling. A proxy's
added latency at concurrency 1 is the difference between going through it and going
direct, and behind the simulated engine that difference is lost in the engine's own
latency, which depends on when a request arrives within its step loop and moves by more
than a proxy adds. Behind this engine it is not.

Its text is one word per token (``" x"``), and its usage counts the prompt with the
shared tokenizer. It runs whole requests only: PD legs are refused, and so are the options
it does not apply (``stop``, logprobs, ``n`` > 1, ``echo``), which it would otherwise
answer as if honoured. Its context is
:data:`INSTANT_MAX_MODEL_LEN` tokens: a request past it is cut to it, or refused, as the
simulated engine (and vLLM) does it (a ``max_tokens`` of a hundred million had held the
server for minutes).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from sage_llm import tokens
from sage_llm.engines.base import Chunk, EngineRequest, EngineStats, KVHandle, Usage
from sage_llm.engines.sse import estimate_prompt_tokens
from sage_llm.errors import InvalidRequestError
from sage_llm.sim.engine import check_request_fields, check_sampling, is_text, min_tokens_of
from sage_llm.sim.server_requests import context_max_tokens

__all__ = ["INSTANT_MAX_MODEL_LEN", "InstantEngine"]

_WORD = " x"
_WORD_IDS = (tokens.token_id(_WORD),)
"""Its token id (``return_token_ids``), as the shared tokenizer gives it."""
_NOT_APPLIED = ("logprobs", "top_logprobs", "prompt_logprobs", "stop_token_ids", "n", "echo")
"""Request options the instant engine does not apply (``n`` of 1 is every answer's)."""

INSTANT_MAX_MODEL_LEN = 32768
"""The instant engine's ``max_model_len`` (prompt and output, tokens)."""


def _asked(key: str, value: object) -> bool:
    """Whether option ``key`` asks for something: ``logprobs: 0`` does (the chosen token's
    log-probability), ``n: 1``, ``echo: false`` and ``stop_token_ids: []`` do not."""
    if value is None or value is False or value == []:
        return False
    return not (key == "n" and value == 1)


class InstantEngine:
    """An :class:`~sage_llm.engines.base.EngineClient` whose every answer is immediate."""

    generated_pieces = (_WORD,)
    """The text of every token it generates (its server's ``/detokenize`` reads them)."""

    def __init__(self, instance_id: str, max_model_len: int = INSTANT_MAX_MODEL_LEN) -> None:
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int):
            raise ValueError(f"max_model_len must be an integer, got {max_model_len!r}")
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        self._id = instance_id
        self.max_model_len = max_model_len
        """Prompt and output tokens a request may have together."""
        self._prompt_tokens = 0
        self._generated = 0

    @property
    def instance_id(self) -> str:
        return self._id

    async def generate(self, req: EngineRequest) -> AsyncIterator[Chunk]:
        """``req.max_tokens`` chunks of one token each; the last carries the usage."""
        if req.kv_transfer_params:  # a decode leg would run whole: no KV, nothing said
            raise _no_pd_legs()
        asked = [k for k in _NOT_APPLIED if _asked(k, req.extra.get(k))]
        if req.stop:
            asked.insert(0, "stop")
        if asked:  # answered as if not asked, they would look honoured
            raise InvalidRequestError(
                f"an instant engine (engine-sim --instant, for measuring a proxy) does not "
                f"apply {asked[0]}: leave it out, or use the simulated engine",
                param=asked[0],
            )
        check_sampling(req.extra)  # refused as the simulated engine (and vLLM) refuse them
        check_request_fields(req)  # (a suffix, return_token_ids that is not a boolean)
        min_tokens_of(req)  # refused as the simulated engine refuses it (its output is fixed)
        prompt = estimate_prompt_tokens(req)
        given = "max_tokens" if req.send_max_tokens else None
        n = context_max_tokens(
            self.max_model_len, prompt, max(1, req.max_tokens), given, text=is_text(req)
        )
        self._prompt_tokens += prompt
        self._generated += n
        for _ in range(n - 1):
            yield Chunk(text=_WORD, token_ids=_WORD_IDS)
        yield Chunk(text=_WORD, finish_reason="length", usage=Usage(prompt, n), token_ids=_WORD_IDS)

    async def prefill(self, req: EngineRequest) -> KVHandle:
        raise _no_pd_legs()

    async def context_length(self) -> int | None:
        """The engine's ``max_model_len`` (:data:`INSTANT_MAX_MODEL_LEN` unless given)."""
        return self.max_model_len

    def queue_time_s(self, request_id: str) -> float | None:
        """Nothing waits here: every request's queue time is 0 (the engine server records
        it in ``vllm:request_queue_time_seconds``, as it does the simulated engine's)."""
        return 0.0

    async def health(self) -> bool:
        return True

    async def stats(self) -> EngineStats:
        return EngineStats(
            prompt_tokens_total=float(self._prompt_tokens),
            generation_tokens_total=float(self._generated),
            source="sim",
            counts_tokens=True,
        )

    async def aclose(self) -> None:
        return None


def _no_pd_legs() -> InvalidRequestError:
    return InvalidRequestError(
        "an instant engine (engine-sim --instant) runs whole requests only: it does not "
        "apply kv_transfer_params (no PD legs); leave it out, or use the simulated engine",
        param="kv_transfer_params",
    )
