"""The one way the control plane talks to an engine instance.

:class:`EngineClient` is implemented by the HTTP client (vLLM, SGLang, any OpenAI-compatible
server) and by the in-process simulated engine, so every test can run the real control
plane against simulated engines.

Contract:

* ``generate`` yields :class:`Chunk` objects as the engine produces them. The last chunk has
  ``finish_reason`` set and carries ``usage``. Cancelling the consuming task (or closing the
  iterator) must abort the request on the engine.
* Failures raise :class:`sage_llm.errors.EngineError`; ``retryable=True`` only when the
  engine produced nothing for this request, so a retry elsewhere cannot duplicate work.
* ``complete`` (optional; the HTTP client has it) returns every chunk of a request the engine
  answers in one piece (``stream`` false) at its end, as ``generate`` would yield them; the
  control plane calls it instead of ``generate`` for such requests when a client has it.
* ``generate_batches`` (optional, :class:`BatchingEngineClient`; the HTTP client has it)
  yields what ``generate`` yields a list at a time: the chunks that arrived together (one
  read from the engine), never an empty list. The control plane calls it instead of
  ``generate`` when a client has it, and relays a lone stream from it in the relaying task.
* ``prefill`` runs the first leg of a PD request (vLLM ``kv_transfer_params`` protocol) and
  returns the parameters the decode leg needs.
* No method blocks the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Protocol, runtime_checkable

from sage_llm.errors import EngineError, InvalidRequestError
from sage_llm.fastinit import field_filler

ENGINE_STREAM = ("sampled", "always", "client")
"""The control plane's ``engine_stream`` settings (see :attr:`EngineRequest.stream`): stream
the engine calls whose client streams and a sample of the others (``sampled``, the
default), every engine call (``always``), or only those whose client streams
(``client``)."""


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One generation request as sent to an engine.

    Exactly one of ``prompt`` (completions API; text or token ids) and ``messages`` (chat API)
    is set. ``extra`` holds body fields passed through unchanged (``n``, ``logprobs``,
    ``seed``, ``stream_options`` …). ``kv_transfer_params`` is set on PD legs. ``stream``
    asks the engine for its output as it comes (``stream: true``); without it an HTTP engine
    answers in one piece at the end, and the control plane measures no TTFT or TPOT for the
    request (in-process simulated engines produce chunks as they go either way).
    """

    request_id: str
    model: str
    prompt: str | Sequence[int] | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    max_tokens: int = 16
    temperature: float | None = 1.0
    """None: not sent, the engine's own default (the model's generation config on vLLM)."""
    top_p: float | None = 1.0
    """None: not sent, as ``temperature``."""
    stop: Sequence[str] = ()
    stream: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)
    kv_transfer_params: Mapping[str, Any] | None = None
    priority: int = 2
    send_max_tokens: bool = True
    """False: ``max_tokens`` is the control plane's estimate, not sent (the engine's own
    default applies; an in-process simulated engine produces that many tokens)."""

    @property
    def api(self) -> Literal["chat", "completions"]:
        return "chat" if self.messages is not None else "completions"

    def with_changes(self, **changes: Any) -> EngineRequest:
        return replace(self, **changes)


def answered_whole(extra: Mapping[str, Any]) -> bool:
    """Whether a request with these passed-through body fields must be answered by its
    engine in one piece, not streamed unless its client streams: vLLM refuses
    ``prompt_logprobs`` with ``stream: true`` (a stream has no place for them), and answers
    ``echo`` differently streamed (the prompt's token ids, without being asked, and no
    ``prompt_logprobs``) than whole (``prompt_logprobs`` with ``logprobs``, no token ids)."""
    return extra.get("prompt_logprobs") is not None or extra.get("echo") is True


def asks_prompt_logprobs(req: EngineRequest) -> bool:
    """Whether ``req`` asks its engine for its prompt's logprobs (:func:`prompt_logprobs_asked`).
    vLLM computes every token of such a prompt itself: it reads neither its prefix cache
    nor KV handed over by a prefill instance (``skip_reading_prefix_cache``)."""
    return prompt_logprobs_asked(req.extra, chat=req.messages is not None)


def prompt_logprobs_asked(extra: Mapping[str, Any], *, chat: bool) -> bool:
    """Whether body fields ``extra`` ask for the prompt's logprobs, as vLLM reads them:
    ``prompt_logprobs``, or ``echo`` with ``logprobs`` (completions) or with
    ``top_logprobs`` not null (chat, where it is 0 when absent)."""
    if extra.get("prompt_logprobs") is not None:
        return True
    if extra.get("echo") is not True:
        return False
    if chat:
        return "top_logprobs" not in extra or extra["top_logprobs"] is not None
    return extra.get("logprobs") is not None


fill_engine_request = field_filler(EngineRequest, tuple(f.name for f in fields(EngineRequest)))
"""``fill_engine_request(*values)``: an :class:`EngineRequest` from all its field values in
field order (as ``EngineRequest(*values)``, several times faster: one is made per request)."""


def embeddings_refusal(exc: EngineError, model: str, where: str) -> InvalidRequestError | None:
    """The client's error for an engine (``where``) that answered an embeddings request
    404 or 405: it has no embeddings route, so the request is refused as the client's
    (a 400 naming ``model``), not failed as the engine's; None for any other failure."""
    if exc.status not in (404, 405):
        return None
    return InvalidRequestError(
        f"model {model!r} is not served by an engine that supports embeddings "
        f"({where} answered {exc.status})",
        param="model",
    )


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of a request. ``cached_tokens`` (prompt tokens served from the prefix
    cache) is None when the engine did not say (vLLM without
    ``--enable-prompt-tokens-details`` answers ``prompt_tokens_details: null``). ``extra``
    holds the other fields of the engine's ``usage`` object (``completion_tokens_details``:
    reasoning tokens, …), passed on to the client as they came; None when there are none."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = 0
    extra: Mapping[str, Any] | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of generated output.

    ``text`` may be empty (e.g. a final usage-only chunk). ``index`` is the choice index
    when ``n > 1``. The gateway writes its own response objects from these fields (its
    request id and model name, vLLM's shape), whatever the engine's objects looked like,
    with what the engine sent beyond them passed on: ``fields`` holds the other fields of
    the choice's delta (or message), such as ``tool_calls``, ``reasoning_content`` or
    ``refusal``, ``extras`` the choice's own other fields, such as ``stop_reason`` or
    ``prompt_logprobs`` (None when there are none), and ``top`` the other fields of the
    engine's response object itself (a chat answer's ``prompt_logprobs`` and
    ``prompt_token_ids``, ``system_fingerprint`` …), on the first chunk of the event or
    answer that carried them.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: Any = None
    index: int = 0
    fields: Mapping[str, Any] | None = None
    extras: Mapping[str, Any] | None = None
    top: Mapping[str, Any] | None = None

    def with_usage(self, usage: Usage) -> Chunk:
        """This chunk with ``usage`` (``replace`` without its per-call field walk)."""
        return fill_chunk(
            self.text, self.token_ids, self.finish_reason, usage, self.logprobs, self.index,
            self.fields, self.extras, self.top,
        )  # fmt: skip

    def with_top(self, top: Mapping[str, Any]) -> Chunk:
        """This chunk carrying ``top`` (the engine object's own other fields)."""
        return fill_chunk(
            self.text, self.token_ids, self.finish_reason, self.usage, self.logprobs,
            self.index, self.fields, self.extras, top,
        )  # fmt: skip


fill_usage = field_filler(Usage, tuple(f.name for f in fields(Usage)))
"""``fill_usage(prompt, completion, cached, extra)``: a :class:`Usage` without its
``__init__``."""
fill_chunk = field_filler(Chunk, tuple(f.name for f in fields(Chunk)))
"""``fill_chunk(*values)``: a :class:`Chunk` from all its field values in field order (one
or more are parsed from every engine answer)."""


@dataclass(frozen=True, slots=True)
class KVHandle:
    """What the prefill leg of a PD request returns: the decode leg sends ``params`` on."""

    instance_id: str
    params: Mapping[str, Any]
    prompt_tokens: int = 0
    cached_tokens: int = 0
    first_token: Chunk | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Live load figures scraped from an engine (Prometheus ``/metrics`` or in-process).

    Counters (``*_total``) are cumulative since the engine started.
    """

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    """Fraction of KV cache blocks in use, 0..1."""
    prefix_cache_queries_total: float = 0.0
    prefix_cache_hits_total: float = 0.0
    preemptions_total: float = 0.0
    prompt_tokens_total: float = 0.0
    generation_tokens_total: float = 0.0
    num_gpu_blocks: int | None = None
    block_size: int | None = None
    source: str = ""
    """Which metric family the figures came from (``vllm``, ``sglang``, ``llamacpp``, ``sim``)."""
    counts_tokens: bool = False
    """Whether the engine reported its token counters (``prompt_tokens_total`` or
    ``generation_tokens_total``): only then does a standstill of both mean it processed
    nothing (see ``HealthSettings.stall_timeout_s``)."""
    steps_total: float = 0.0
    """Forward passes the engine ran, where it counts them (llama.cpp's ``llama_decode``
    calls, ``llamacpp:n_decode_total``): its progress while its token counters stand
    still (llama.cpp adds a request's generated tokens only when the request ends)."""
    max_lora: int = 0
    """LoRA adapters one batch of the engine may hold (vLLM's ``--max-loras``, from
    ``vllm:lora_requests_info``); 0: not known, or LoRA off."""
    lora_adapters: frozenset[str] = frozenset()
    """The LoRA adapters of its running and waiting requests, as it last said (a request
    for another adapter waits while they fill ``max_lora``)."""

    def lora_room(self, adapter: str) -> bool:
        """Whether a request for ``adapter`` can join the engine's batch without waiting
        for a LoRA slot: it is among :attr:`lora_adapters`, a slot is free, or the engine
        does not say (``max_lora`` 0)."""
        lora = self.lora_adapters
        return not self.max_lora or adapter in lora or len(lora) < self.max_lora

    @property
    def prefix_hit_rate(self) -> float:
        if self.prefix_cache_queries_total <= 0:
            return 0.0
        return self.prefix_cache_hits_total / self.prefix_cache_queries_total


@runtime_checkable
class EngineClient(Protocol):
    """A connection to one engine instance."""

    @property
    def instance_id(self) -> str: ...

    def generate(self, req: EngineRequest) -> AsyncIterator[Chunk]:
        """The answer's chunks, in order, as the engine produces them. The last one, and
        only the last, carries ``usage``, with the (last) ``finish_reason``: the gateway
        ends a relayed stream at it, before the request's end is recorded. Closing the
        iterator early aborts the request on the engine."""
        ...

    async def prefill(self, req: EngineRequest) -> KVHandle: ...

    async def health(self) -> bool: ...

    async def stats(self) -> EngineStats: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class EmbeddingEngineClient(EngineClient, Protocol):
    """An :class:`EngineClient` whose engine serves embeddings (``HTTPEngineClient``):
    the control plane sends ``/v1/embeddings`` calls only to such clients."""

    async def embed(
        self,
        model: str,
        inputs: list[str] | list[list[int]],
        options: Mapping[str, Any] | None = None,
        *,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """The engine's OpenAI-style answer for ``inputs`` (texts or token-id lists);
        ``options`` are the request's other fields, passed as they are; ``request_id``
        names the call to the engine (an HTTP engine's ``X-Request-Id``)."""
        ...


class BatchingEngineClient(EngineClient, Protocol):
    """An :class:`EngineClient` that also yields its chunks a read at a time."""

    def generate_batches(self, req: EngineRequest) -> AsyncIterator[list[Chunk]]:
        """``generate``'s chunks, as lists of those that arrived together (none empty);
        closing it aborts the request as closing ``generate`` does."""
        ...


@runtime_checkable
class ReportsAdapters(Protocol):
    """An engine client that can list the LoRA adapters its engine serves beside the
    instance's model (vLLM's ``GET /v1/models`` cards whose ``parent`` is that model)."""

    async def lora_adapters(self) -> list[str] | None:
        """The adapters' names; None when the engine does not say."""
        ...


@runtime_checkable
class LoadsAdapters(Protocol):
    """An engine client that can load and unload LoRA adapters at run time (vLLM's
    ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``)."""

    async def load_lora_adapter(self, name: str, path: str) -> None:
        """Load the adapter at ``path`` as ``name``; an :class:`EngineError` when the
        engine does not."""
        ...

    async def unload_lora_adapter(self, name: str) -> None:
        """Unload the adapter ``name``; an :class:`EngineError` when the engine does not."""
        ...


@runtime_checkable
class ReportsContextLength(Protocol):
    """An engine client that can say the longest context (prompt and output, in tokens)
    its engine serves: vLLM's ``max_model_len`` (``GET /v1/models``), or a simulated
    engine's. The gateway's model cards show it."""

    async def context_length(self) -> int | None:
        """The engine's ``max_model_len`` for the instance's model; None when it does not
        say."""
        ...
