"""The OpenAI-compatible HTTP API over one engine.

    POST /v1/completions        POST /v1/chat/completions     (stream: true -> server-sent events)
    GET  /v1/models             GET  /health                  GET /metrics (Prometheus)

    app = build_app(ServedModel("smollm2", engine, tokenizer), api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every request is checked before it reaches the engine; a bad one is answered with OpenAI's
error JSON and a 4xx naming the field. A client that goes away aborts its requests (their
KV blocks go back at once). Past ``max_waiting`` queued requests the server answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fusegen.distributed import TensorParallelError
from fusegen.runtime.engine import Engine
from fusegen.serve.choices import Choice, chat_logprobs, completion_logprobs
from fusegen.serve.loop import EngineLoop, Overloaded, Spec
from fusegen.serve.metrics import ServerMetrics
from fusegen.serve.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError

log = logging.getLogger("fusegen.serve")

_SEED_SPAN = 1 << 64


@dataclass
class ServedModel:
    """What the server serves: a name clients use, the engine, its tokenizer, and the model's
    sampling defaults (``generation_config``), which explicit request values override."""
    name: str
    engine: Engine
    tokenizer: object
    defaults: dict = field(default_factory=dict)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_request_len

    @property
    def capacity(self) -> int:
        """The longest request (prompt + new tokens) the model and the KV pool can hold."""
        kv = self.engine.kv
        return min(self.max_model_len, kv.num_blocks * kv.block_size + 1)   # the last token is never cached


def build_app(served: ServedModel, api_key: str | None = None, max_waiting: int = 1024,
              on_fatal=None) -> FastAPI:
    """``on_fatal(exc)``: called when the engine loop ends for good (a tensor-parallel rank
    is gone)."""
    loop = EngineLoop(served.engine, max_waiting, on_fatal)
    metrics = ServerMetrics(loop)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            loop.stop()

    app = FastAPI(title="fusegen", lifespan=lifespan)
    app.state.served, app.state.loop, app.state.metrics = served, loop, metrics
    _install_errors(app, metrics)

    async def authorize(request: Request) -> None:
        """The /v1/ routes' key check (a dependency, not a middleware: Starlette's HTTP
        middleware would hide a client's disconnect from the handler)."""
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise OpenAIError(401, "Incorrect API key provided (send 'Authorization: Bearer KEY')",
                                  type="authentication_error", code="invalid_api_key")

    keyed = [Depends(authorize)]

    @app.get("/health")
    async def health():
        alive = loop.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", dependencies=keyed)
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "fusegen", "max_model_len": served.max_model_len}]}

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(body: CompletionRequest, request: Request):
        _check_model(served, body)   # before tokenizing anything
        prompts = [_prompt_ids(served, p) for p in body.prompts()]
        return await _serve(request, served, loop, metrics, body, prompts, chat=False)

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(served, body)
        return await _serve(request, served, loop, metrics, body, [_chat_ids(served, body)], chat=True)

    return app


# --- errors -------------------------------------------------------------------------------------

def _install_errors(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError):
        return _error_response(exc, metrics, request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _error_response(_validation_error(exc), metrics, request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(OpenAIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                           type=kind), metrics, request)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return _error_response(OpenAIError(500, f"internal error ({type(exc).__name__}); see the server log",
                                           type="server_error"), metrics, request)


def _error_response(error: OpenAIError, metrics: ServerMetrics, request: Request) -> JSONResponse:
    metrics.requests.labels(_endpoint(request), str(error.status)).inc()
    return JSONResponse(error.body(), status_code=error.status)


def _endpoint(request: Request) -> str:
    """The route's path, or "unmatched" (a label per random URL would grow without bound)."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


# pydantic names the member of a union it tried in an error's location: not a field.
_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "function-wrap"}


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    first = exc.errors()[0]
    where = [str(p) for p in first.get("loc", ()) if p != "body" and not
             (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))]
    if first.get("type") == "json_invalid":
        return OpenAIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                           code="invalid_json")
    param = ".".join(where) or None
    message = first.get("msg", "invalid value")
    if "input" in first and param:
        message = f"{param}: {message} (got {json.dumps(first['input'], default=str)[:100]})"
    return OpenAIError(400, message, param)


# --- prompts ------------------------------------------------------------------------------------

def _prompt_ids(served: ServedModel, prompt) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise OpenAIError(400, "prompt must not be empty", "prompt")
        return served.tokenizer(prompt).input_ids
    if not prompt:
        raise OpenAIError(400, "prompt must not be empty", "prompt")
    return list(prompt)


def _chat_ids(served: ServedModel, body: ChatCompletionRequest) -> list[int]:
    tokenizer = served.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(400, f"{served.name}'s tokenizer has no chat template; use /v1/completions",
                          "messages")
    from jinja2 import TemplateError

    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:   # e.g. a template that wants roles to alternate
        raise OpenAIError(400, f"the chat template refused these messages: {exc}", "messages") from None
    return tokenizer(text, add_special_tokens=False).input_ids


def _check_model(served: ServedModel, body) -> None:
    if body.model is not None and body.model != served.name:
        raise OpenAIError(404, f"the model '{body.model}' does not exist; this server serves '{served.name}'",
                          "model", type="not_found_error", code="model_not_found")


def _max_tokens(served: ServedModel, body, prompt: list[int], chat: bool) -> int:
    limit = served.capacity
    asked = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
    if len(prompt) >= limit:
        raise OpenAIError(400, f"this model's maximum context length is {limit} tokens, but the prompt has "
                               f"{len(prompt)} tokens", "messages" if chat else "prompt")
    if asked is None:
        return limit - len(prompt) if chat else min(16, limit - len(prompt))
    if len(prompt) + asked > limit:
        raise OpenAIError(400, f"this model's maximum context length is {limit} tokens, but the request asks "
                               f"for {len(prompt) + asked} ({len(prompt)} in the prompt + {asked} max_tokens)",
                          "max_tokens")
    return asked


def _sampling(served: ServedModel, body, index: int) -> dict:
    d = served.defaults
    pick = lambda value, name, default: value if value is not None else d.get(name, default)
    top_k = pick(body.top_k, "top_k", 0)
    top_k = 0 if top_k >= (served.engine.vocab_size or 1 << 62) else top_k   # keeping every token is off
    seed = None if body.seed is None else (body.seed + index + (1 << 63)) % _SEED_SPAN - (1 << 63)
    return {"temperature": float(pick(body.temperature, "temperature", 1.0)),
            "top_p": float(pick(body.top_p, "top_p", 1.0)), "top_k": max(int(top_k), 0),
            "repetition_penalty": float(pick(body.repetition_penalty, "repetition_penalty", 1.0)), "seed": seed,
            **({"eos_token_ids": []} if body.ignore_eos else {})}


# --- one request --------------------------------------------------------------------------------

async def _serve(request: Request, served: ServedModel, loop: EngineLoop, metrics: ServerMetrics, body,
                 prompts: list[list[int]], chat: bool):
    budgets = [_max_tokens(served, body, p, chat) for p in prompts]
    top = _top_logprobs(body, chat)
    arrived = time.perf_counter()
    choices = await _submit(served, loop, body, prompts, budgets, top)
    metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
    endpoint = request.url.path
    run = _Run(served, loop, metrics, body, chat, choices, arrived, top, prompts)
    if body.stream:
        metrics.requests.labels(endpoint, "200").inc()
        return StreamingResponse(run.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    if not await run.collect(request):
        metrics.requests.labels(endpoint, "499").inc()
        return Response(status_code=499)   # nobody is listening any more
    metrics.requests.labels(endpoint, "200").inc()
    return JSONResponse(run.response())


def _top_logprobs(body, chat: bool) -> int:
    """How many log-probs per token the engine reports: 0 (none) or at least 1."""
    if chat:
        return max(body.top_logprobs or 0, 1) if body.logprobs else 0
    return max(body.logprobs, 1) if body.logprobs is not None else 0


async def _submit(served, loop, body, prompts, budgets, top) -> list[tuple[Choice, object]]:
    eos = frozenset() if body.ignore_eos else served.engine.eos_token_ids
    count = len(prompts) * body.n
    if count > loop.max_waiting:
        raise OpenAIError(400, f"{len(prompts)} prompts x n={body.n} = {count} requests; the server queues at "
                               f"most {loop.max_waiting}", "prompt")
    specs = [Spec(prompt, budget, _sampling(served, body, p * body.n + i), top)
             for p, (prompt, budget) in enumerate(zip(prompts, budgets)) for i in range(body.n)]
    try:
        subs = await loop.submit(specs)
    except Overloaded as exc:
        raise OpenAIError(503, f"the server is overloaded: {exc}; retry later", type="server_overloaded") from None
    except ValueError as exc:
        raise OpenAIError(400, str(exc), "prompt") from None
    except TensorParallelError as exc:
        raise OpenAIError(503, f"the engine stopped: {exc}", type="server_error") from None
    return [(Choice(index, sub.request_id, served.tokenizer, body.stops(), eos), sub)
            for index, sub in enumerate(subs)]


def _abort(loop: EngineLoop, choices) -> None:
    for choice, _ in choices:
        if not choice.finished:
            loop.abort(choice.request_id)


class _Run:
    """The choices of one HTTP request, fed by their events."""

    def __init__(self, served, loop, metrics, body, chat, choices, arrived, top, prompts):
        self.served, self.loop, self.metrics, self.body, self.chat = served, loop, metrics, body, chat
        self.choices, self.arrived, self.top, self.prompts = choices, arrived, top, prompts
        self.shown_top = (body.top_logprobs or 0) if chat else (body.logprobs or 0)   # alternatives shown
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self._last: dict[int, float] = {}

    async def _next(self, choice: Choice, sub):
        item = await sub.events.get()
        if isinstance(item, BaseException):
            raise OpenAIError(500, f"request {choice.request_id} failed in the engine: {item}",
                              type="server_error") from None
        now = time.perf_counter()
        last = self._last.get(choice.index)
        (self.metrics.ttft if last is None else self.metrics.per_token).observe(now - (last or self.arrived))
        self._last[choice.index] = now
        self.metrics.generation_tokens.inc()
        delta = choice.take(item)
        if delta.finish_reason and not item.finished:   # a stop string: the engine may still run it
            self.loop.abort(choice.request_id)
        if delta.finish_reason:
            self.metrics.latency.observe(now - self.arrived)
        return delta

    async def collect(self, request: Request) -> bool:
        """Run every choice to its end; False if the client went away first (then, as on
        any error, every choice is aborted)."""
        async def one(choice, sub):
            while not choice.finished:
                await self._next(choice, sub)

        work = asyncio.ensure_future(asyncio.gather(*(one(c, s) for c, s in self.choices)))
        try:
            while not work.done():
                await asyncio.wait([work], timeout=0.25)
                if not work.done() and await request.is_disconnected():
                    return False
            await work
            return True
        finally:
            work.cancel()   # the siblings of a choice that failed, or all on a disconnect
            _abort(self.loop, self.choices)

    async def events(self):
        """Server-sent events: one chunk per piece of text, then usage (if asked) and [DONE]."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(choice, sub):
            try:
                while not choice.finished:
                    await merged.put((choice, await self._next(choice, sub)))
            except OpenAIError as exc:
                await merged.put((choice, exc))
            except Exception as exc:  # noqa: BLE001 - the stream must end, not hang
                log.exception("streaming choice %d failed", choice.index)
                await merged.put((choice, OpenAIError(500, f"internal error ({type(exc).__name__})",
                                                      type="server_error")))

        tasks = [asyncio.ensure_future(pump(c, s)) for c, s in self.choices]
        try:
            if self.chat:
                for choice, _ in self.choices:
                    yield _sse(self._chunk(choice, {"role": "assistant", "content": ""}))
            open_ = len(self.choices)
            while open_:
                batch = await _drain(merged)
                out = []
                for choice, delta in batch:
                    if isinstance(delta, OpenAIError):
                        out.append(_sse(delta.body()))
                        open_ -= 1
                    elif delta.text or delta.logprobs or delta.finish_reason or self.body.return_token_ids:
                        content = {"content": delta.text} if self.chat else delta.text
                        out.append(_sse(self._chunk(choice, content, delta)))
                        open_ -= bool(delta.finish_reason)
                yield "".join(out)
            if self._include_usage:
                yield _sse(self._envelope([], usage=self._usage()))
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()
            _abort(self.loop, self.choices)

    # --- bodies -------------------------------------------------------------------------------

    @property
    def _include_usage(self) -> bool:
        return bool(self.body.stream and self.body.stream_options and self.body.stream_options.include_usage)

    def _envelope(self, choices: list, usage=None) -> dict:
        kind = ("chat.completion.chunk" if self.body.stream else "chat.completion") if self.chat else "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.served.name, "choices": choices}
        if usage is not None or not self.body.stream or self._include_usage:
            out["usage"] = usage   # null on the chunks before the usage chunk, as OpenAI sends it
        return out

    def _chunk(self, choice: Choice, content, delta=None) -> dict:
        finish_reason, infos = (delta.finish_reason, delta.logprobs) if delta is not None else (None, [])
        if self.chat:
            entry = {"index": choice.index, "delta": content if finish_reason is None or content.get("content")
                     else {}, "logprobs": chat_logprobs(infos, self.shown_top), "finish_reason": finish_reason}
        else:
            start = len(choice.text) - len(content)
            entry = {"index": choice.index, "text": content,
                     "logprobs": completion_logprobs(infos, start, self.body.logprobs or 0),
                     "finish_reason": finish_reason}
        if delta is not None and self.body.return_token_ids:
            entry["token_ids"] = delta.token_ids   # the tokens this chunk adds
        return self._envelope([entry])

    def response(self) -> dict:
        entries = []
        for choice, _ in self.choices:
            if self.chat:
                entry = {"index": choice.index, "message": {"role": "assistant", "content": choice.text},
                         "logprobs": chat_logprobs(choice.logprobs, self.shown_top),
                         "finish_reason": choice.finish_reason}
            else:
                entry = {"index": choice.index, "text": choice.text,
                         "logprobs": completion_logprobs(choice.logprobs, 0, self.body.logprobs or 0),
                         "finish_reason": choice.finish_reason}
            if self.body.return_token_ids:
                entry["token_ids"] = choice.token_ids
            entries.append(entry)
        return self._envelope(entries, usage=self._usage())

    def _usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.token_ids) for c, _ in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _drain(merged: asyncio.Queue) -> list:
    """The next (choice, delta) items: one awaited, then all that are already queued, with the
    deltas of one choice merged. A client that keeps up gets a chunk per token; one that
    falls behind gets fewer, larger chunks instead of a growing backlog."""
    items = [await merged.get()]
    while not merged.empty():
        items.append(merged.get_nowait())
    out: list = []
    at: dict[int, int] = {}
    for choice, delta in items:
        i = at.get(choice.index)
        if i is not None and not isinstance(delta, OpenAIError) and not isinstance(out[i][1], OpenAIError):
            out[i] = (choice, out[i][1].merge(delta))
        else:
            at[choice.index] = len(out)
            out.append((choice, delta))
    return out


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
