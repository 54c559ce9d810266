"""The one engine behind a plain :class:`~sage_llm.service.vllm_service.VLLMService`.

* :class:`EngineBackend` talks to an engine through an
  :class:`~sage_llm.engines.base.EngineClient`: an OpenAI-compatible HTTP endpoint (vLLM,
  SGLang, any OpenAI-compatible server), or an in-process simulated engine
  (``engine = "sim"``, whose embeddings are the deterministic
  :func:`~sage_llm.service.embeddings.sim_embedding`).
* :class:`InProcessVLLMBackend` hosts ``vllm.LLM`` in this process, as SAGE's VLLMService
  does (needs the ``vllm`` extra). Its blocking calls run in a worker thread, one at a time.

Both run on the service's event loop and answer with the VLLMService result shapes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol

from sage_llm.control_plane.intake import build_request
from sage_llm.control_plane.records import (
    ChoiceParts,
    add_output,
    choice_parts,
    choice_result,
)
from sage_llm.engines.base import EngineClient, Usage, embeddings_refusal
from sage_llm.errors import (
    ConfigError,
    ConflictError,
    DeadlineExceededError,
    EngineError,
    EngineRequestRejectedError,
    InvalidRequestError,
    ModelNotFoundError,
    SageLLMError,
    raise_problems,
)
from sage_llm.service.config import DEFAULT_ENGINE, VLLMServiceConfig
from sage_llm.service.embeddings import (
    EmbedRequest,
    embed_result,
    sim_embedding,
    vectors_from_openai,
)
from sage_llm.service.payloads import PromptInput, locate_error, suggest
from sage_llm.service.results import generation, generation_entry, to_metadata
from sage_llm.tokens import chat_prompt_text, count_tokens
from sage_llm.types import ExecutionInstance

__all__ = ["Backend", "EngineBackend", "InProcessVLLMBackend", "make_backend", "vllm_installed"]

log = logging.getLogger("sage_llm.service")

VLLM_MISSING = (
    "vLLM is not installed, so VLLMService cannot host the model in this process: install "
    "the vllm extra (pip install 'sage-llm[vllm]'), or give an engine endpoint (base_url, or "
    'host and port), or set engine = "sim" for a simulated engine'
)


class Backend(Protocol):
    """What VLLMService needs from its engine. Every method runs on the service loop."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def generate(
        self, items: list[PromptInput], request_ids: list[str]
    ) -> list[dict[str, Any]]: ...

    async def embed(self, req: EmbedRequest) -> dict[str, Any]: ...

    async def models(self) -> list[str]: ...


def vllm_installed() -> bool:
    """Whether ``import vllm`` works here."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def make_backend(cfg: VLLMServiceConfig) -> Backend:
    """The backend ``cfg`` asks for; raises ConfigError when vLLM is needed but missing."""
    if cfg.backend in ("http", "sim"):
        return EngineBackend(cfg)
    if not vllm_installed():
        raise ConfigError(VLLM_MISSING, key="engine")
    check_engine_arguments(cfg)
    return InProcessVLLMBackend(cfg)


def vllm_engine_arguments() -> frozenset[str]:
    """The keyword arguments ``vllm.LLM`` takes: its own and ``vllm.EngineArgs``'s fields
    (empty when vLLM cannot say)."""
    from vllm import LLM, EngineArgs

    names: set[str] = set()
    if dataclasses.is_dataclass(EngineArgs):
        names.update(f.name for f in dataclasses.fields(EngineArgs))
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    try:
        params = inspect.signature(LLM.__init__).parameters.values()
        names.update(p.name for p in params if p.kind in named and p.name != "self")
    except (TypeError, ValueError):  # pragma: no cover - a signature inspect cannot read
        pass
    return frozenset(names)


def check_engine_arguments(cfg: VLLMServiceConfig) -> None:
    """:class:`ConfigError` (``engine.<name>``; several: ConfigErrors) for each argument of
    the ``engine`` / ``embedding_engine`` tables that ``vllm.LLM`` does not take (it had
    failed ``setup()`` with a raw TypeError), and for ``model``, which ``model_id`` sets."""
    known = vllm_engine_arguments()
    problems: list[ConfigError] = []
    tables: list[tuple[str, Mapping[str, Any], Mapping[str, Any]]] = [
        ("engine", cfg.engine, {}),
        ("embedding_engine", cfg.embedding_engine, cfg.engine),
    ]
    for key, table, inherited in tables:
        for name in table:
            if name in inherited:  # (the embedding engine's are the engine's, and its own)
                continue
            if name == "model":
                problems.append(ConfigError(
                    "is set by model_id (embedding_model_id for embedding_engine): leave it "
                    "out", key=f"{key}.model"))  # fmt: skip
            elif known and name not in known:
                problems.append(ConfigError(
                    f"is not an argument of vllm.LLM (vllm.EngineArgs){suggest(name, known)}",
                    key=f"{key}.{name}"))  # fmt: skip
    raise_problems(problems)


def service_instance(cfg: VLLMServiceConfig) -> ExecutionInstance:
    """The engine of ``cfg`` as an instance (``engine="sim"`` for the simulated one)."""
    sim = cfg.sim
    metadata: dict[str, Any] = {
        "sim_gpu": str(sim.get("gpu", "h100")),
        "sim_speed": float(sim.get("speed", 1.0)),
    }
    if sim.get("model"):
        metadata["sim_model"] = str(sim["model"])
    if sim.get("seed") is not None:
        metadata["sim_seed"] = int(sim["seed"])
    return ExecutionInstance(
        instance_id="vllm-service",
        host=cfg.host or "127.0.0.1",
        port=cfg.port or 8000,
        model_name=cfg.model_id,
        tensor_parallel_size=int(cfg.engine.get("tensor_parallel_size", 1)),
        max_concurrent_requests=int(sim.get("max_concurrent_requests", 256)),
        engine="sim" if cfg.backend == "sim" else cfg.dialect,
        scheme=cfg.scheme,
        api_key=cfg.api_key,
        metadata=metadata,
    )


def local_embedding_model(cfg: VLLMServiceConfig, req: EmbedRequest) -> str:
    """The model an embedding computed here (simulated or in-process vLLM) is of:
    ``embedding_model_id`` or ``model_id``; :class:`ModelNotFoundError` when the request
    names another."""
    model = cfg.embedding_model_id or cfg.model_id
    if req.model is not None and req.model != model:
        raise ModelNotFoundError(
            f"this service embeds with {model!r}, not {req.model!r}", param="options.model"
        )
    return model


def sim_embed(cfg: VLLMServiceConfig, req: EmbedRequest) -> dict[str, Any]:
    """``embed`` answered by ``engine = "sim"``: :func:`sim_embedding` of each text, of
    ``sim.embedding_dimension`` (64) dimensions (computed here: no engine call)."""
    model = local_embedding_model(cfg, req)
    dim = int(cfg.sim.get("embedding_dimension", 64))
    return embed_result(model, [sim_embedding(t, dim) for t in req.texts], req.normalize)


def model_not_served(
    exc: EngineError, model: str | None, *, named: bool
) -> ModelNotFoundError | None:
    """The :class:`ModelNotFoundError` an engine's 404 for ``model`` is (vLLM's "The model
    `x` does not exist"; a refusal of the request, such as no such route, is not one);
    None for any other failure. ``named``: the payload gave the model (``param`` then
    names it)."""
    if exc.status != 404 or isinstance(exc, EngineRequestRejectedError):
        return None
    return ModelNotFoundError(
        f"model {model!r} is not served by the engine ({exc.message})",
        param="model" if named else None,
    )


class EngineBackend:
    """One engine reached through an EngineClient (HTTP endpoint or simulated engine)."""

    def __init__(self, cfg: VLLMServiceConfig) -> None:
        self._cfg = cfg
        self._instance = service_instance(cfg)
        self._client: EngineClient | None = None
        self._session: Any = None
        self._in_flight: set[str] = set()
        """Request ids running now: a second one is refused, as the control plane does."""

    async def start(self) -> None:
        if self._cfg.backend == "sim":
            from sage_llm.sim.factory import make_sim_engine

            self._client = make_sim_engine(self._instance)
            return
        from sage_llm.engines.http import HTTPEngineClient, make_session

        self._session = make_session()
        self._client = HTTPEngineClient(self._instance, self._session, dialect=self._cfg.dialect)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        try:
            if client is not None:
                await client.aclose()
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None

    def _require(self) -> EngineClient:
        if self._client is None:
            raise EngineError("the engine client is not started", retryable=False)
        return self._client

    async def generate(
        self, items: list[PromptInput], request_ids: list[str]
    ) -> list[dict[str, Any]]:
        timeouts = [i.options.timeout_s for i in items if i.options.timeout_s is not None]
        many = len(items) > 1
        entries: list[dict[str, Any]] = await _all(
            [
                self._located(item, rid, f"inputs[{index}]" if many else None)
                for index, (item, rid) in enumerate(zip(items, request_ids, strict=True))
            ],
            min(timeouts) if timeouts else None,
            "generate",
        )
        return entries

    async def _located(
        self, item: PromptInput, request_id: str, where: str | None
    ) -> dict[str, Any]:
        """:meth:`_one`, its errors naming the payload's part (as the control plane's are)."""
        if request_id in self._in_flight:
            exc: SageLLMError = ConflictError(
                f"request {request_id!r} is already in progress", param="request_id"
            )
            locate_error(exc, where)
            raise exc
        self._in_flight.add(request_id)
        try:
            return await self._one(item, request_id)
        except SageLLMError as exc:
            locate_error(exc, where)
            raise
        finally:
            self._in_flight.discard(request_id)

    async def _one(self, item: PromptInput, request_id: str) -> dict[str, Any]:
        client = self._require()
        model = self._cfg.model_id
        if item.options.model is not None and item.options.model != model:
            raise ModelNotFoundError(
                f"this service serves {model!r}, not {item.options.model!r}", param="model"
            )
        meta = to_metadata(item, request_id)
        default_max = item.options.max_tokens or 512
        _, req = build_request(
            meta, model, now=0.0, stream=True, default_max_tokens=default_max, block_size=16
        )
        choices: dict[int, ChoiceParts] = {}  # by index (n > 1: one per sample)
        finish: str | None = None
        usage: Usage | None = None
        try:
            async for chunk in client.generate(req):
                add_output(choice_parts(choices, chunk.index), chunk)
                finish = chunk.finish_reason or finish
                usage = chunk.usage or usage
        except EngineError as exc:
            unknown = model_not_served(exc, model, named=item.options.model is not None)
            if unknown is not None:
                raise unknown from exc
            raise
        if finish is None:
            raise EngineError(f"request {request_id!r}: the engine ended without a finish reason",
                              instance_id=client.instance_id, retryable=False)  # fmt: skip
        prompt = item.prompt if item.prompt is not None else chat_prompt_text(item.messages or [])
        asked = item.options.logprobs is not None
        results = [choice_result(choices[i], i) for i in sorted(choices)]
        return generation_entry(
            request_id=request_id,
            generations=[
                generation(c.text, c.token_ids, c.logprobs if asked else None, c.finish_reason)
                for c in results
            ],
            input_tokens=usage.prompt_tokens if usage else count_tokens(prompt),
            output_tokens=(
                usage.completion_tokens if usage else sum(len(c.token_ids or ()) for c in results)
            ),
        )

    async def embed(self, req: EmbedRequest) -> dict[str, Any]:
        model = req.model or self._cfg.embedding_model_id or self._cfg.model_id
        if self._cfg.backend == "sim":
            return sim_embed(self._cfg, req)
        client = self._require()
        embed = getattr(client, "embed", None)
        if embed is None:  # pragma: no cover - HTTPEngineClient has it
            raise EngineError("this engine client cannot embed", retryable=False)
        try:
            answers: list[dict[str, Any]] = await _all(
                [embed(model, req.texts)], req.timeout_s, "embed"
            )
        except EngineError as exc:  # as the control plane answers it
            refusal = embeddings_refusal(exc, model, "the engine")
            if refusal is not None:
                raise refusal from exc
            raise
        answer = answers[0]
        return embed_result(model, vectors_from_openai(answer, len(req.texts)), req.normalize)

    async def models(self) -> list[str]:
        """The model this service generates with (as the control plane lists its one
        instance's), not whatever else the engine's server lists."""
        return [self._cfg.model_id]


async def _all(coros: list[Coroutine[Any, Any, Any]], limit_s: float | None, what: str) -> Any:
    """Run ``coros`` concurrently; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        async with asyncio.timeout(limit_s):
            return await asyncio.gather(*tasks)
    except TimeoutError:
        raise DeadlineExceededError(
            f"{what} did not finish within the {limit_s} s timeout"
        ) from None
    finally:
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


def shutdown_engine(llm: Any) -> None:
    """Stop a ``vllm.LLM``'s engine: ``LLM.shutdown()`` where vLLM has it, else its engine
    core client's ``shutdown()`` (vLLM 0.32: ``llm.llm_engine.engine_core``)."""
    engine = getattr(llm, "llm_engine", None)
    for owner in (llm, engine, getattr(engine, "engine_core", None)):
        shutdown = getattr(owner, "shutdown", None)
        if callable(shutdown):
            shutdown()
            return


class InProcessVLLMBackend:
    """``vllm.LLM`` hosted in this process (SAGE's original VLLMService behaviour)."""

    def __init__(self, cfg: VLLMServiceConfig) -> None:
        self._cfg = cfg
        self._llm: Any = None
        self._embedder: Any = None
        self._lock: asyncio.Lock | None = None

    async def start(self) -> None:
        self._lock = asyncio.Lock()
        self._llm = await asyncio.to_thread(
            self._load, self._cfg.model_id, self._cfg.engine, "engine"
        )

    @staticmethod
    def _load(model: str, engine: Mapping[str, Any], key: str) -> Any:
        """``vllm.LLM(model=model, **engine)``; its failure a :class:`ConfigError` (``key``)
        for arguments vLLM refuses, else an :class:`EngineError`, with vLLM's message. The
        default ``max_model_len`` (4096) gives way to a model's shorter context."""
        from vllm import LLM

        args = {**dict(engine), "model": model}
        try:
            return LLM(**args)
        except Exception as exc:
            default = args.get("max_model_len") == DEFAULT_ENGINE["max_model_len"]
            if not (default and "derived max_model_len" in str(exc)):
                raise load_failure(exc, model, key) from exc
        log.warning("%s: its context is shorter than the default max_model_len %s: it runs "
                    "with its own", model, args.pop("max_model_len"))  # fmt: skip
        try:
            return LLM(**args)
        except Exception as exc:
            raise load_failure(exc, model, key) from exc

    async def aclose(self) -> None:
        """Shut the engines down (vLLM's engine core and worker processes, which dropping
        the ``LLM`` leaves running until Python exits), in a worker thread."""
        engines = [e for e in (self._llm, self._embedder) if e is not None]
        self._llm = self._embedder = None
        for engine in engines:
            await asyncio.to_thread(shutdown_engine, engine)

    async def _blocking(self, fn: Any, *args: Any) -> Any:
        if self._lock is None or self._llm is None:
            raise EngineError("the in-process vLLM engine is not started", retryable=False)
        lock = self._lock
        await lock.acquire()
        work = asyncio.ensure_future(asyncio.to_thread(fn, *args))

        def done(task: asyncio.Future[Any]) -> None:
            # The engine takes the next call once this one's thread has returned, even
            # when its caller left (timed out, cancelled): vLLM's LLM runs one at a time.
            lock.release()
            if not task.cancelled():
                task.exception()  # (retrieved: a caller that left does not read it)

        work.add_done_callback(done)
        return await asyncio.shield(work)

    async def generate(
        self, items: list[PromptInput], request_ids: list[str]
    ) -> list[dict[str, Any]]:
        """:meth:`_generate_sync` in the worker thread, within the inputs' ``timeout``
        (the shortest), for this service's model only, as the HTTP services answer."""
        model = self._cfg.model_id
        for index, item in enumerate(items):
            if item.options.model is not None and item.options.model != model:
                exc = ModelNotFoundError(
                    f"this service serves {model!r}, not {item.options.model!r}", param="model"
                )
                locate_error(exc, f"inputs[{index}]" if len(items) > 1 else None)
                raise exc
        timeouts = [i.options.timeout_s for i in items if i.options.timeout_s is not None]
        result: list[list[dict[str, Any]]] = await _all(
            [self._blocking(self._generate_sync, items, request_ids)],
            min(timeouts) if timeouts else None,
            "generate",
        )
        return result[0]

    def _generate_sync(
        self, items: list[PromptInput], request_ids: list[str]
    ) -> list[dict[str, Any]]:
        """Run ``items`` on the engine; vLLM's refusals as :mod:`sage_llm.errors`, naming
        the input (``inputs[i]`` in a batch), as the HTTP services name them."""
        many = len(items) > 1
        params = []
        for index, item in enumerate(items):
            try:
                params.append(_sampling_params(item))
            except Exception as exc:
                raise engine_failure(exc, f"inputs[{index}]" if many else None) from exc
        try:
            outputs = self._run(items, params)
        except Exception as exc:
            culprit = self._culprit(items) if many and _refused(exc) else None
            raise engine_failure(exc, None if culprit is None else f"inputs[{culprit}]") from exc
        entries = []
        for item, out, rid in zip(items, outputs, request_ids, strict=True):
            seqs = out.outputs  # one per sample (n)
            generations = [
                generation(
                    seq.text,
                    list(seq.token_ids),
                    self._logprobs(item, seq),
                    getattr(seq, "finish_reason", None),
                )
                for seq in seqs
            ]
            entries.append(
                generation_entry(
                    request_id=rid,
                    generations=generations,
                    input_tokens=len(out.prompt_token_ids or ()),
                    output_tokens=sum(len(seq.token_ids) for seq in seqs),
                )
            )
        return entries

    def _logprobs(self, item: PromptInput, seq: Any) -> list[dict[str, Any]] | None:
        """The logprobs of ``seq`` (vLLM's ``{token_id: Logprob}`` per token) as the HTTP
        path gives them: OpenAI's format for the input's kind, one piece per token; None
        unless asked for."""
        count = item.options.logprobs
        steps = getattr(seq, "logprobs", None)
        if count is None or steps is None:
            return None

        def decode(token_id: int, logprob: Any = None) -> str:
            text = getattr(logprob, "decoded_token", None)
            if isinstance(text, str):
                return text
            return str(self._llm.get_tokenizer().decode([token_id]))

        chat = item.messages is not None
        return [
            (chat_logprobs if chat else completion_logprobs)(step, token_id, count, decode, offset)
            for token_id, step, offset in zip(
                seq.token_ids, steps, _offsets(seq.token_ids, steps, decode), strict=False
            )
        ]

    def _run(self, items: list[PromptInput], params: list[Any]) -> list[Any]:
        """The engine's outputs of ``items`` (prompts in one call, chats in another), in
        input order."""
        outputs: dict[int, Any] = {}
        prompts = [i for i, item in enumerate(items) if item.prompt is not None]
        chats = [i for i, item in enumerate(items) if item.messages is not None]
        if prompts:
            got = self._llm.generate(
                [items[i].prompt for i in prompts], [params[i] for i in prompts], use_tqdm=False
            )
            outputs.update(zip(prompts, got, strict=True))
        if chats:
            got = self._llm.chat(
                [items[i].messages for i in chats], [params[i] for i in chats], use_tqdm=False
            )
            outputs.update(zip(chats, got, strict=True))
        return [outputs[i] for i in range(len(items))]

    def _culprit(self, items: list[PromptInput]) -> int | None:
        """The index of the batch's input the engine refuses on its own (vLLM's refusal of
        a batch does not say which), tried one at a time for one token; None when none is
        refused alone."""
        for index, item in enumerate(items):
            try:
                self._run([item], [_sampling_params(item, max_tokens=1)])
            except Exception as exc:
                if _refused(exc):
                    return index
        return None

    async def embed(self, req: EmbedRequest) -> dict[str, Any]:
        model = local_embedding_model(self._cfg, req)
        vectors: list[list[float]] = await self._blocking(self._embed_sync, req.texts)
        return embed_result(model, vectors, req.normalize)

    def _embed_sync(self, texts: list[str]) -> list[list[float]]:
        cfg = self._cfg
        if cfg.embedding_model_id and cfg.embedding_model_id != cfg.model_id:
            if self._embedder is None:
                self._embedder = self._load(
                    cfg.embedding_model_id, cfg.embedding_engine, "embedding_engine"
                )
            engine = self._embedder
        else:
            engine = self._llm
        if not hasattr(engine, "embed"):
            raise EngineError("this vLLM build has no embedding API (LLM.embed)", retryable=False)
        try:
            return [list(map(float, o.outputs.embedding)) for o in engine.embed(texts)]
        except Exception as exc:
            runner = getattr(getattr(engine, "model_config", None), "runner_type", None)
            if _refused(exc) and runner is not None and runner != "pooling":
                model = cfg.embedding_model_id or cfg.model_id  # as the HTTP service says it
                raise InvalidRequestError(
                    f"model {model!r} is not served by an engine that supports embeddings "
                    f"(the in-process vLLM engine: {exc})",
                    param="model",
                ) from exc
            raise engine_failure(exc, None) from exc

    async def models(self) -> list[str]:
        cfg = self._cfg
        return [m for m in (cfg.model_id, cfg.embedding_model_id) if m]


def _sampling_params(item: PromptInput, **override: Any) -> Any:
    """The ``vllm.SamplingParams`` of ``item`` (vLLM checks them as it builds them)."""
    from vllm import SamplingParams

    o = item.options
    kw = {"max_tokens": o.max_tokens, "temperature": o.temperature, "top_p": o.top_p,
          "stop": list(o.stop) or None, "logprobs": o.logprobs, **o.extra, **override}  # fmt: skip
    return SamplingParams(**{k: v for k, v in kw.items() if v is not None})


def _refused(exc: BaseException) -> bool:
    """Whether vLLM refused the request itself (a ``VLLMClientError``, or the
    ``ValueError`` / ``TypeError`` of its checks), not failed."""
    if isinstance(exc, ValueError | TypeError | InvalidRequestError):
        return True
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # an older vLLM: its refusals are ValueErrors
        return False
    return isinstance(exc, VLLMClientError)


def engine_failure(exc: BaseException, where: str | None) -> SageLLMError:
    """An in-process vLLM engine's exception as the :mod:`sage_llm.errors` one the HTTP
    services raise: a refusal of the request is an :class:`EngineRequestRejectedError`
    (``param`` the field vLLM names, ``input_text`` for a prompt past the context), any
    other failure an :class:`EngineError`; named after the payload's part (``where``:
    ``inputs[2]`` in a batch) by :func:`locate_error`."""
    if isinstance(exc, SageLLMError):
        err = exc
    elif _refused(exc):
        param = getattr(exc, "parameter", None)
        err = EngineRequestRejectedError(
            f"the in-process vLLM engine rejected the request: {exc or type(exc).__name__}",
            param=param if isinstance(param, str) else None,
        )
    else:
        err = EngineError(
            f"the in-process vLLM engine failed: {type(exc).__name__}: {exc}", retryable=False
        )
    locate_error(err, where)
    return err


def load_failure(exc: Exception, model: str, key: str) -> SageLLMError:
    """``vllm.LLM``'s failure to load ``model``: arguments it refuses (a ValueError, as
    pydantic's ValidationError is, or a TypeError) are a :class:`ConfigError` of ``key``,
    anything else an :class:`EngineError`; both carry vLLM's message."""
    what = f"vLLM could not load {model!r}: {type(exc).__name__}: {exc}"
    if isinstance(exc, ValueError | TypeError):
        return ConfigError(what, key=key)
    return EngineError(what, retryable=False)


_Decode = Callable[..., str]


def _offsets(token_ids: Sequence[int], steps: Sequence[Any], decode: _Decode) -> list[int]:
    """Each token's offset in the answer's text (OpenAI's ``text_offset``)."""
    offsets, at = [], 0
    for token_id, step in zip(token_ids, steps, strict=False):
        offsets.append(at)
        at += len(decode(token_id, (step or {}).get(token_id)))
    return offsets


def _lp(logprob: Any) -> float:
    return max(float(logprob.logprob), -9999.0)  # (-inf is not JSON: OpenAI's floor)


def completion_logprobs(
    step: Mapping[int, Any] | None, token_id: int, count: int, decode: _Decode, offset: int
) -> dict[str, Any]:
    """One token's piece of a prompt's logprobs, as vLLM's /v1/completions streams it:
    ``{"text_offset", "token_logprobs", "tokens", "top_logprobs"}``, the top ``count + 1``
    (the sampled token's first)."""
    if step is None or token_id not in step:
        return {"text_offset": [offset], "token_logprobs": [None], "tokens": [decode(token_id)],
                "top_logprobs": [None]}  # fmt: skip
    top = {decode(t, lp): _lp(lp) for i, (t, lp) in enumerate(step.items()) if i <= count}
    return {"text_offset": [offset], "token_logprobs": [_lp(step[token_id])],
            "tokens": [decode(token_id, step[token_id])], "top_logprobs": [top]}  # fmt: skip


def chat_logprobs(
    step: Mapping[int, Any] | None, token_id: int, count: int, decode: _Decode, offset: int
) -> dict[str, Any]:
    """One token's piece of a chat's logprobs, as vLLM's /v1/chat/completions streams it:
    ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``, ``count`` of them in
    ``top_logprobs``."""

    def entry(t: int, lp: Any) -> dict[str, Any]:
        token = decode(t, lp)
        value = -9999.0 if lp is None else _lp(lp)
        return {"token": token, "logprob": value, "bytes": list(token.encode("utf-8", "replace"))}

    if step is None or token_id not in step:  # (vLLM's defaults for a token without one)
        return {"content": [{**entry(token_id, None), "top_logprobs": []}]}
    top = [entry(t, lp) for i, (t, lp) in enumerate(step.items()) if i < count]
    return {"content": [{**entry(token_id, step[token_id]), "top_logprobs": top}]}
