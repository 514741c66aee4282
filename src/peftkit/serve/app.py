"""The HTTP side: an OpenAI-compatible FastAPI app in front of an :class:`~peftkit.serve.engine.Engine`.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``. The ``model`` field of a request picks
the adapter; the base model's own name means no adapter.

Nothing here touches the model: tokenizing runs in a worker thread, generation in the engine's
thread, and results come back through an ``asyncio.Queue``, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..tuner import BASE
from . import schemas
from .adapters import OutsideRoot, confined
from .config import ServeConfig
from .engine import AdapterNotFound, Engine, EngineStopped, Output, QueueFull, SamplingParams
from .engine import Request as GenRequest
from .errors import APIError, bad_request, install_handlers, model_not_found

log = logging.getLogger("peftkit.serve")


def load_base(name_or_path: str, device: str | None = None, dtype: str = "auto") -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``--model``: a local model directory, a catalogue name such as
    ``smollm2-135m-instruct`` (converted once into the cache), or a hub id when online."""
    from ..hub import is_seq2seq, load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(name_or_path, dtype="float32" if dtype == "auto" and device == "cpu" else dtype)
    if is_seq2seq(model.config):
        raise ValueError(f"--model {name_or_path} is an encoder-decoder model; peftkit serve runs causal language models.")
    return model.to(device), tokenizer


def build(config: ServeConfig) -> tuple[FastAPI, Engine]:
    """Load the base model and the start-up adapters; return the app and its (not yet started) engine."""
    model, tokenizer = load_base(config.model, config.device, config.dtype)
    engine = Engine(model, tokenizer, max_batch_size=config.max_batch_size, max_queue=config.max_queue,
                    max_model_len=config.max_model_len, kv_cache=config.kv_cache,
                    prepack_weights=config.prepack_weights)
    for name, path in config.adapters.items():
        if name == config.model_name:
            raise ValueError(f"Adapter name {name!r} is the base model's name; pick another.")
        try:
            engine.load_adapter(name, path).result()
        except (MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as e:  # one line for the command line, whatever the loader raised
            raise ValueError(f"--adapter {name}={path}: {_reason(e)}") from e
    app = create_app(engine, tokenizer, model_name=config.model_name, api_key=config.api_key, adapter_root=config.adapter_root)
    return app, engine


def create_app(engine: Engine, tokenizer: Any, *, model_name: str, api_key: str | None = None,
               adapter_root: str | None = None) -> FastAPI:
    """The FastAPI app. Its lifespan starts the engine and, on shutdown, lets it finish what is running."""
    server = _Server(engine, tokenizer, model_name, api_key, adapter_root)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)  # drain: in-flight requests finish first

    app = FastAPI(title="peftkit serve", lifespan=lifespan)
    install_handlers(app)
    app.state.server = server

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "adapters": sorted(engine.adapters), **engine.stats()}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(server.check_key)])
    v1.add_api_route("/models", server.models, methods=["GET"])
    v1.add_api_route("/completions", server.completions, methods=["POST"])
    v1.add_api_route("/chat/completions", server.chat_completions, methods=["POST"])
    v1.add_api_route("/load_lora_adapter", server.load_lora_adapter, methods=["POST"])
    v1.add_api_route("/unload_lora_adapter", server.unload_lora_adapter, methods=["POST"])
    app.include_router(v1)
    return app


class _Server:
    """Route handlers with the state they share."""

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, api_key: str | None, adapter_root: str | None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.api_key = api_key
        self.adapter_root = Path(adapter_root).resolve() if adapter_root else None
        self._tokenizer_lock = threading.Lock()  # fast tokenizers must not be used from two threads at once

    # --- access -----------------------------------------------------------------------------------
    async def check_key(self, authorization: str | None = Header(None)) -> None:
        if self.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Missing or incorrect API key: send the header 'Authorization: Bearer <key>'.", code="invalid_api_key")

    def adapter_for(self, model: str) -> str:
        if model == self.model_name:
            return BASE
        if model in self.engine.adapters:
            return model
        raise model_not_found(model, [self.model_name, *sorted(self.engine.adapters)])

    # --- routes -----------------------------------------------------------------------------------
    async def models(self) -> dict:
        cards = [schemas.model_card(self.model_name, self.model_name, None)]
        cards += [schemas.model_card(name, path, self.model_name) for name, path in sorted(self.engine.adapters.items())]
        return {"object": "list", "data": cards}

    async def completions(self, body: schemas.CompletionRequest, request: Request) -> Response:
        adapter = self.adapter_for(body.model)
        body.refuse_unsupported()
        prompts = await asyncio.to_thread(self._encode_prompts, body.prompts())
        return await self._generate(request, body, adapter, prompts, chat=False)

    async def chat_completions(self, body: schemas.ChatCompletionRequest, request: Request) -> Response:
        adapter = self.adapter_for(body.model)
        body.refuse_unsupported()
        prompt = await asyncio.to_thread(self._encode_chat, body.conversation())
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await self._generate(request, body, adapter, [prompt], chat=True)

    async def load_lora_adapter(self, body: schemas.LoadLoraRequest) -> dict:
        if self.adapter_root is None:
            raise APIError(403, "Loading adapters at run time is off: start the server with --adapter-root DIR.",
                           code="adapter_root_not_set")
        try:
            path = confined(body.lora_path, self.adapter_root)
            has_config = (path / "adapter_config.json").is_file()
        except OutsideRoot as e:
            raise APIError(403, f"lora_path {e}", code="path_not_allowed", param="lora_path") from None
        except (OSError, ValueError, RuntimeError) as e:  # NUL byte, name too long, a loop of links ...
            raise bad_request(f"lora_path {body.lora_path[:200]!r} is not a usable path: {e}", "lora_path") from None
        if not has_config:
            raise bad_request(f"{body.lora_path!r} has no adapter_config.json.", "lora_path")
        if body.lora_name == self.model_name:
            raise bad_request(f"{body.lora_name!r} is the base model's name; pick another.", "lora_name")
        try:
            future = self.engine.load_adapter(body.lora_name, str(path))
        except ValueError as e:  # a bad or taken name
            raise bad_request(str(e), "lora_name") from None
        try:
            await asyncio.wrap_future(future)
        except (MemoryError, torch.OutOfMemoryError) as e:
            raise APIError(503, f"Out of memory while loading adapter {body.lora_name!r}: {e}", code="out_of_memory") from None
        except Exception as e:
            # The adapter itself is the problem (unservable, invalid config, unreadable or mismatched
            # tensors, sizes that cannot be allocated); the engine has left the model as it was.
            raise APIError(422, f"Could not load adapter {body.lora_name!r}: {_reason(e)}",
                           code="adapter_not_loadable", param="lora_path") from None
        return {"object": "lora_adapter", "id": body.lora_name, "path": str(path), "status": "loaded"}

    async def unload_lora_adapter(self, body: schemas.UnloadLoraRequest) -> dict:
        try:
            future = self.engine.unload_adapter(body.lora_name)
        except AdapterNotFound:
            raise model_not_found(body.lora_name, [self.model_name, *sorted(self.engine.adapters)]) from None
        await asyncio.wrap_future(future)  # waits for the adapter's running requests to finish
        return {"object": "lora_adapter", "id": body.lora_name, "status": "unloaded"}

    # --- prompts ----------------------------------------------------------------------------------
    def _encode_prompts(self, prompts: list[str | list[int]]) -> list[list[int]]:
        vocab = len(self.tokenizer)
        out = []
        for p in prompts:
            if isinstance(p, str):
                with self._tokenizer_lock:
                    ids = self.tokenizer(p).input_ids
            else:
                ids = list(p)
                if any(not 0 <= i < vocab for i in ids):
                    raise bad_request(f"prompt token ids must be in [0, {vocab}).", "prompt")
            if not ids:
                raise bad_request("prompt is empty.", "prompt")
            out.append(ids)
        return out

    def _encode_chat(self, conversation: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(f"{self.model_name} has no chat template; use /v1/completions.", "messages")
        with self._tokenizer_lock:
            try:
                text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # jinja errors: wrong roles, order the template refuses, ...
                raise bad_request(f"The chat template refused these messages: {e}", "messages") from None
            # The template writes the special tokens (BOS, role markers) itself.
            return self.tokenizer(text, add_special_tokens=False).input_ids

    # --- generation -------------------------------------------------------------------------------
    async def _generate(self, http: Request, body: Any, adapter: str, prompts: list[list[int]], chat: bool) -> Response:
        limit = self.engine.max_model_len
        stop = body.stop_strings()
        requests: list[GenRequest] = []
        queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for ids in prompts:
            if len(ids) >= limit:
                raise APIError(413, f"The prompt has {len(ids)} tokens; this model's context is {limit} tokens.",
                               code="context_length_exceeded", param="messages" if chat else "prompt")
            max_tokens = body.max_tokens if body.max_tokens is not None else limit - len(ids)
            if len(ids) + max_tokens > limit:
                raise bad_request(f"The prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds this model's "
                                  f"context of {limit} tokens; lower max_tokens.", "max_tokens")
            for j in range(body.n):
                # n > 1: different, still repeatable samples. Wrapped into the unsigned 64-bit seeds torch takes.
                seed = None if body.seed is None else (body.seed + j) % 2**64
                params = SamplingParams(max_tokens, body.temperature, body.top_p, stop, seed)
                requests.append(GenRequest(ids, adapter, params, _emitter(loop, queue, len(requests))))
        if len(requests) > self.engine.max_queue:  # no retry can help: refuse, do not ask to retry later (429)
            raise bad_request(f"This request asks for {len(requests)} completions (n x prompts); this server queues at "
                              f"most {self.engine.max_queue}. Lower n or send fewer prompts per request.", "n")
        try:
            self.engine.submit(requests)
        except QueueFull as e:
            raise APIError(429, f"Too many requests are waiting: {e}", code="queue_full") from None
        except AdapterNotFound:
            raise model_not_found(body.model, [self.model_name, *sorted(self.engine.adapters)]) from None
        except EngineStopped as e:
            raise APIError(503, str(e), code="shutting_down") from None
        except ValueError as e:
            raise bad_request(str(e), "max_tokens") from None

        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        prompt_tokens = sum(len(ids) for ids in prompts)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._stream(rid, body.model, created, chat, requests, queue, prompt_tokens, include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        texts, reasons = [""] * len(requests), [None] * len(requests)
        watcher = asyncio.create_task(_abort_on_disconnect(http, self.engine, requests))
        try:
            pending = len(requests)
            while pending:
                i, out = await queue.get()
                if out.finish_reason == "abort" and watcher.done():
                    return Response(status_code=499)  # the client has gone; nobody reads this
                if out.error:
                    raise APIError(500, f"Generation failed: {out.error}")
                if out.finish_reason == "abort":
                    raise APIError(503, "The request was cancelled by the server.", code="aborted")
                texts[i] += out.text
                if out.finish_reason:
                    reasons[i], pending = out.finish_reason, pending - 1
        finally:
            watcher.cancel()
            self.engine.abort([r for r in requests if not r.finished])
        use = schemas.usage(prompt_tokens, sum(len(r.generated) for r in requests))
        build = schemas.chat_completion if chat else schemas.completion
        return JSONResponse(build(rid, body.model, created, texts, reasons, use))

    async def _stream(self, rid: str, model: str, created: int, chat: bool, requests: list[GenRequest],
                      queue: asyncio.Queue, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        def chunk(index: int, text: str, reason: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                data = schemas.chat_chunk(rid, model, created, index, delta, reason)
            else:
                data = schemas.completion_chunk(rid, model, created, index, text, reason)
            return _sse(data)

        try:
            if chat:
                for i in range(len(requests)):
                    yield chunk(i, "", None, first=True)
            pending = len(requests)
            while pending:
                i, out = await queue.get()
                if out.error or out.finish_reason == "abort":
                    message = f"Generation failed: {out.error}" if out.error else "The request was cancelled by the server."
                    yield _sse(APIError(500 if out.error else 503, message).body())
                    break
                if out.text or out.finish_reason:
                    yield chunk(i, out.text, out.finish_reason)
                pending -= out.finish_reason is not None
            else:
                if include_usage:
                    use = schemas.usage(prompt_tokens, sum(len(r.generated) for r in requests))
                    yield _sse(schemas.usage_chunk(rid, model, created, "chat.completion.chunk" if chat else "text_completion", use))
            yield "data: [DONE]\n\n"
        finally:  # also runs when the client disconnects and the response task is cancelled
            self.engine.abort([r for r in requests if not r.finished])


async def _abort_on_disconnect(http: Request, engine: Engine, requests: list[GenRequest]) -> None:
    """Wait for the client of a non-streaming request to hang up, then abort its requests: their batch
    slots free up at the engine's next step instead of decoding to max_tokens for nobody. (A streaming
    response notices by itself: writing to a closed connection cancels it.)"""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    engine.abort([r for r in requests if not r.finished])


def _reason(error: BaseException) -> str:
    """An exception as a client should read it: the message, with the class name where it adds meaning."""
    if isinstance(error, re.error) and error.pattern is not None:
        return f"invalid regular expression {error.pattern!r}: {error.msg}"
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return message if isinstance(error, (ValueError, KeyError, OSError)) else f"{type(error).__name__}: {message}"


def _emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
    """A callback for the engine thread that hands ``(index, output)`` to the event loop."""

    def emit(out: Output) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, out))
        except RuntimeError:  # the event loop is closed: nobody waits for this output any more
            pass

    return emit


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def serve(config: ServeConfig, log_level: str = "info") -> int:
    """Run the server until SIGINT/SIGTERM; in-flight requests finish before it exits."""
    import uvicorn

    app, engine = build(config)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.create_server((config.host, config.port), family=family)
    host, port = sock.getsockname()[:2]
    adapters = ", ".join(engine.adapters) or "none"
    print(f"peftkit serve: {config.model_name} (adapters: {adapters}) on http://{host}:{port}/v1", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=None))
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; by then there is
    # nothing left to do, so let that second delivery end the process with status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        print("peftkit serve: error: the server did not start (see the log above).", file=sys.stderr)
        return 1
    return 0
