"""Continuous batching over peftkit's mixed-adapter path: one forward pass per step for every running
request, whatever adapter each one uses.

One worker thread owns the model. Each turn of its loop it
  1. runs control commands (load/unload an adapter) and drops aborted requests,
  2. admits waiting requests and prefills them together as one left-padded batch, each row with its
     own adapter (``PeftModel(..., adapter_names=[...])``), and adds their KV cache to the running
     rows' (see :mod:`peftkit.serve.kv_cache`: preallocated slots, or transformers' dynamic cache),
  3. runs one decoding step for every running row, samples one token per row, and lets finished
     rows leave (their cache rows are dropped).
Other threads (the HTTP server) only call :meth:`Engine.submit`, :meth:`Engine.abort` and the
adapter methods; results come back through each request's ``emit`` callback.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import random
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache

from ..inject import check_adapter_name
from ..model import PeftModel
from ..tuner import BASE
from . import batch
from .adapters import attach
from .kv_cache import KV_CACHES, KvCache, running_cache, static_refusal
from .prepack import prepack_linear_weights
from .text import TextStream


class QueueFull(Exception):
    """More requests are waiting than the engine accepts (``max_queue``)."""


class AdapterNotFound(KeyError):
    """No servable adapter has that name."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and accepts no new requests."""


MIN_TEMPERATURE = 0.01
"""Smallest positive temperature. Below it sampling is greedy in all but name, and dividing logits by a
temperature near zero overflows (1e-300 is 0 in float32); send 0 for greedy decoding."""
SEED_RANGE = (-(2**63), 2**64 - 1)
"""Seeds a torch generator takes: any signed or unsigned 64-bit integer."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens. ``temperature`` 0 means greedy; ``seed`` makes sampling repeatable."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= 2):
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, 2], got {self.temperature!r}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be strings, got {self.stop!r}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed!r}.")


@dataclass
class Output:
    """What a request emits: new text, and at the end a ``finish_reason`` ("stop", "length", "abort")
    with token counts, or an ``error`` message."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation: prompt token ids, the adapter that runs it (``"__base__"`` for none), sampling
    settings, and ``emit`` (called from the worker thread with each :class:`Output`)."""

    prompt_ids: list[int]
    adapter: str
    params: SamplingParams
    emit: Callable[[Output], None]
    id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    aborted: bool = False
    finished: bool = False
    position: int = 0  # position of ``generated[-1]``, the token the next step feeds
    text: TextStream | None = None
    generator: torch.Generator | None = None


class Engine:
    """Serves generation requests for a base model and any number of named adapters.

    Args:
        model: A ``transformers`` causal LM, or a :class:`~peftkit.PeftModel` around one.
        tokenizer: Its tokenizer (used here to turn generated ids into text and to find stop tokens).
        max_batch_size: Most requests decoded together in one forward pass.
        max_queue: Most requests waiting for a batch slot; :meth:`submit` raises :class:`QueueFull` beyond it.
        max_model_len: Longest prompt + completion in tokens (default: the model's ``max_position_embeddings``).
        max_prefill_tokens: Padded prompt tokens prefilled in one step; bounds how long running requests
            wait while new ones join. A longer single prompt is still admitted on its own.
        kv_cache: ``"static"``: the running rows' keys and values live in preallocated slots written in
            place (no copy of the whole cache per step, join or leave); ``"dynamic"``: transformers'
            ``DynamicCache``, grown by concatenation; ``"auto"``: static where the model allows it (not
            with sliding-window layers), else dynamic. Same tokens either way; ``"static"`` for a model
            it cannot serve is refused with the reason.
        prepack_weights: The base model's frozen linear layers compute with oneDNN-prepacked copies of their
            weights (CPU only; :mod:`peftkit.serve.prepack`): faster steps for the linear layers' memory once
            more. Adapters stay separate per row.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_model_len: int | None = None,
        max_prefill_tokens: int = 4096,
        kv_cache: KvCache | Literal["auto"] = "auto",
        prepack_weights: bool = False,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size and max_queue must be >= 1, got {max_batch_size} and {max_queue}.")
        # Wrapped once, here: adapters are attached to and removed from this one PeftModel while the server runs.
        self.model = model if isinstance(model, PeftModel) else PeftModel(model)
        # A private copy: the HTTP side encodes with its own tokenizer in other threads, and a fast
        # tokenizer must not be used from two threads at once.
        self.tokenizer = copy.deepcopy(tokenizer)
        base = self.model.get_base_model()
        config = base.config
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"peftkit serve runs decoder-only causal LMs; {type(base).__name__} is an encoder-decoder.")
        if kv_cache not in (*KV_CACHES, "auto"):
            raise ValueError(f"kv_cache must be auto, {' or '.join(KV_CACHES)}, got {kv_cache!r}.")
        if kv_cache == "auto":
            kv_cache = "dynamic" if static_refusal(config) else "static"
        if kv_cache == "static" and (reason := static_refusal(config)):
            raise ValueError(f"kv_cache='static' cannot serve {type(base).__name__}: {reason}; use kv_cache='dynamic'.")
        self.kv_cache = kv_cache
        if prepack_weights:
            if self.model.peft_config:  # their layers would be packed as if they were the base's
                raise ValueError("prepack_weights packs the base model before adapters are attached; pass the bare base "
                                 "model and load the adapters into the engine.")
        self.prepacked_layers = prepack_linear_weights(base, rows=max_batch_size) if prepack_weights else 0
        self.device = next(base.parameters()).device
        limit = getattr(config, "max_position_embeddings", None)
        self.max_model_len = int(max_model_len or limit or 2048)
        if limit and self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings={limit}.")
        self.max_batch_size, self.max_queue, self.max_prefill_tokens = max_batch_size, max_queue, max_prefill_tokens
        self.eos_ids = _eos_ids(base, tokenizer)
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        forward_args = inspect.signature(base.forward).parameters
        # transformers renamed ``past_key_values`` to ``cache`` in 5.x; accept either spelling.
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in forward_args

        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._commands: list[Callable[[], None]] = []
        self._adapters: dict[str, str] = {}  # servable adapter name -> where it was loaded from
        self._loading: set[str] = set()
        self._unloading: dict[str, Future] = {}
        self._paused = self._in_step = self._stopping = False
        self._thread: threading.Thread | None = None
        # The running batch, touched only by the worker thread.
        self._rows: list[Request] = []
        self._cache = running_cache(kv_cache)  # the running rows' keys and values, row i = self._rows[i]
        self._admitted: list[Request] = []  # admitted this step (failed together with the batch on an error)
        self.counters = dict(steps=0, prefills=0, tokens=0, joins=0, mixed_steps=0, max_rows=0,
                             max_adapters_in_step=0, finished=0, aborted=0, errors=0)

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="peftkit-engine", daemon=True)
            self._thread.start()

    def stop(self, drain: bool = True) -> None:
        """Stop accepting requests; finish the running and waiting ones (``drain``) or abort them; join the worker."""
        with self._cond:
            self._stopping, self._paused = True, False
            if not drain:
                for request in [*self._waiting, *self._rows]:
                    request.aborted = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def pause(self) -> None:
        """Hold the model between steps (maintenance, tests). Commands and aborts are still handled."""
        with self._cond:
            self._paused = True
            while self._in_step:
                self._cond.wait()

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {**self.counters, "running": len(self._rows), "waiting": len(self._waiting), "paused": self._paused}

    # --- requests ---------------------------------------------------------------------------------
    def submit(self, requests: list[Request]) -> None:
        """Queue requests (all or none). Raises AdapterNotFound, QueueFull, EngineStopped or ValueError."""
        with self._cond:
            if self._stopping:
                raise EngineStopped("The server is shutting down.")
            for r in requests:
                if r.adapter != BASE and r.adapter not in self._adapters:
                    raise AdapterNotFound(r.adapter)
                if len(r.prompt_ids) + r.params.max_tokens > self.max_model_len:
                    raise ValueError(
                        f"The prompt ({len(r.prompt_ids)} tokens) plus max_tokens ({r.params.max_tokens}) exceeds the "
                        f"model's context of {self.max_model_len} tokens."
                    )
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (at most {self.max_queue}); retry later.")
            for r in requests:
                r.text = TextStream(self.tokenizer, r.params.stop)
            self._waiting.extend(requests)
            self._cond.notify_all()

    def abort(self, requests: list[Request]) -> None:
        """Stop generating for these requests (a client went away); their batch slots free up next step."""
        with self._cond:
            for r in requests:
                if not r.finished:
                    r.aborted = True
            self._commands.append(lambda: None)  # wake the worker
            self._cond.notify_all()

    # --- adapters ---------------------------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, str]:
        """Servable adapters: name -> the directory each was loaded from."""
        with self._cond:
            return dict(self._adapters)

    def load_adapter(self, name: str, path: str) -> Future:
        """Load a saved adapter under ``name`` between two steps. The future fails with the loader's error."""
        check_adapter_name(name)
        future: Future = Future()
        with self._cond:
            if name in self._adapters or name in self._loading or name in self._unloading:
                raise ValueError(f"An adapter named {name!r} is already loaded; unload it first or pick another name.")
            self._loading.add(name)
            self._commands.append(lambda: self._load(name, path, future))
            self._cond.notify_all()
        if self._thread is None:
            self._run_commands()
        return future

    def unload_adapter(self, name: str) -> Future:
        """Stop routing requests to ``name`` now; remove it from the model once its last request is done."""
        future: Future = Future()
        with self._cond:
            if name not in self._adapters:
                raise AdapterNotFound(name)
            del self._adapters[name]
            self._unloading[name] = future
            self._commands.append(lambda: None)
            self._cond.notify_all()
        if self._thread is None:
            self._finish_unloads()
        return future

    def _load(self, name: str, path: str, future: Future) -> None:
        try:
            attach(self.model, name, path)  # all or nothing: on error the model is as it was
        except Exception as e:
            with self._cond:
                self._loading.discard(name)
            future.set_exception(e)
            return
        with self._cond:
            self._loading.discard(name)
            self._adapters[name] = str(path)
        future.set_result(name)

    def _finish_unloads(self) -> None:
        with self._cond:
            in_use = {r.adapter for r in (*self._rows, *self._waiting)}
            done = [(n, f) for n, f in self._unloading.items() if n not in in_use]
            for name, _ in done:
                del self._unloading[name]
        for name, future in done:
            try:
                self.model.delete_adapter(name)
            except Exception as e:  # pragma: no cover - delete_adapter only fails on a merged adapter
                future.set_exception(e)
            else:
                future.set_result(name)

    # --- the worker -------------------------------------------------------------------------------
    def _ready(self) -> bool:
        busy = bool(self._rows or self._waiting)
        return bool(self._commands) or (self._stopping and not busy) or (busy and not self._paused)

    def _run_commands(self) -> None:
        with self._cond:
            commands, self._commands = self._commands, []
        for command in commands:
            command()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._ready():
                    self._cond.wait()
                if self._stopping and not (self._rows or self._waiting or self._commands):
                    return
            self._run_commands()
            self._drop_aborted()
            self._finish_unloads()
            with self._cond:
                if self._paused or not (self._rows or self._waiting):
                    continue
                self._in_step = True
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as e:  # the shared decoding step failed (out of memory): fail its rows, keep serving
                self._fail([*self._rows, *(r for r in self._admitted if r not in self._rows)], e)
            finally:
                with self._cond:
                    self._in_step = False
                    self._cond.notify_all()
            if self._unloading:
                self._finish_unloads()

    def _step(self) -> None:
        """Admit and prefill waiting requests, then one decoding step for every running row."""
        self._admitted = self._admit()
        if self._admitted:
            self._prefill(self._admitted)
        if self._rows:
            self._decode()

    def _admit(self) -> list[Request]:
        admitted: list[Request] = []
        with self._cond:
            longest = 0
            while self._waiting and len(self._rows) + len(admitted) < self.max_batch_size:
                nxt = self._waiting[0]
                longest_if = max(longest, len(nxt.prompt_ids))
                if admitted and longest_if * (len(admitted) + 1) > self.max_prefill_tokens:
                    break
                admitted.append(self._waiting.popleft())
                longest = longest_if
        return admitted

    def _prefill(self, new: list[Request]) -> None:
        """Prefill ``new`` together and let the rows that go on join the running batch. If the forward pass
        fails, prefill each request alone, so that only one that fails by itself gets an error. Running
        rows are untouched either way: a prefill builds a cache of its own."""
        try:
            prefilled = self._prefill_forward(new)
        except Exception as e:
            if len(new) == 1:
                self._fail_alone(new[0], e)
                return
            for r in new:
                try:
                    alone = self._prefill_forward([r])
                except Exception as e:
                    self._fail_alone(r, e)
                else:
                    self._join([r], *alone)
            return
        self._join(new, *prefilled)

    def _prefill_forward(self, new: list[Request]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """``(logits, cache, mask)`` of the prompts of ``new``, left-padded into one batch."""
        ids, mask = batch.left_padded([r.prompt_ids for r in new], self.pad_id, self.device)
        cache = DynamicCache()
        logits = self._forward(ids, mask, batch.positions_from_mask(mask), cache, [r.adapter for r in new])
        self.counters["prefills"] += 1
        return logits, cache, mask

    def _join(self, new: list[Request], logits: torch.Tensor, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Sample each new row's first token; the rows that did not finish join the running batch."""
        for r in new:
            r.position = len(r.prompt_ids)
        done = self._advance(new, logits)
        keep = [i for i in range(len(new)) if i not in done]
        if not keep:
            return
        if done:
            mask = batch.select(cache, mask, keep)
        joining = [new[i] for i in keep]
        if self._rows:
            self.counters["joins"] += 1
        self._cache.join(cache, mask)
        with self._cond:
            self._rows = self._rows + joining

    def _decode(self) -> None:
        rows = self._rows
        ids = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)
        positions = torch.tensor([[r.position] for r in rows], device=self.device)
        cache, mask = self._cache.step()
        adapters = [r.adapter for r in rows]
        logits = self._forward(ids, mask, positions, cache, adapters)
        c = self.counters
        c["steps"] += 1
        c["max_rows"] = max(c["max_rows"], len(rows))
        distinct = len(set(adapters))
        c["mixed_steps"] += distinct > 1
        c["max_adapters_in_step"] = max(c["max_adapters_in_step"], distinct)
        for r in rows:
            r.position += 1
        done = self._advance(rows, logits)
        if done:
            self._keep([i for i in range(len(rows)) if i not in done])

    def _forward(self, ids, mask, positions, cache, adapters: list[str]) -> torch.Tensor:
        """Logits of the last position of each row, (B, vocab)."""
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, self._cache_arg: cache,
                  "use_cache": True, "adapter_names": adapters}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs).logits[:, -1, :]

    def _advance(self, rows: list[Request], logits: torch.Tensor) -> set[int]:
        """Sample one token per row, emit the new text; returns the indices of rows that finished.
        A row that fails here (its sampler, its text, its client's callback) finishes with its own
        error; the other rows go on as if it had never been in the batch."""
        greedy = logits.argmax(-1).tolist()
        done = set()
        for i, r in enumerate(rows):
            try:
                finished = self._advance_row(r, logits[i], greedy[i])
            except Exception as e:
                self._fail_alone(r, e)
                finished = True
            if finished:
                done.add(i)
        return done

    def _advance_row(self, r: Request, logits: torch.Tensor, greedy: int) -> bool:
        p = r.params
        if p.temperature > 0:
            if r.generator is None:
                seed = p.seed if p.seed is not None else random.getrandbits(63)
                r.generator = torch.Generator(device=logits.device).manual_seed(seed)
            token = batch.sample(logits, p.temperature, p.top_p, r.generator)
        else:
            token = greedy
        r.generated.append(token)
        self.counters["tokens"] += 1
        reason = None
        if token in self.eos_ids:
            reason = "stop"
        elif len(r.generated) >= p.max_tokens or r.position + 1 >= self.max_model_len:
            reason = "length"
        text_ids = r.generated[:-1] if reason == "stop" else r.generated
        piece, stopped = r.text.update(text_ids, final=reason is not None)
        if stopped:
            reason = "stop"
        if reason is not None:
            r.finished = True
            self.counters["finished"] += 1
        if piece or reason:
            r.emit(Output(piece, reason, len(r.prompt_ids), len(r.generated)))
        return reason is not None

    def _keep(self, keep: list[int]) -> None:
        """Keep running rows ``keep``; the cache says in which order they go on (slots are refilled)."""
        order = self._cache.keep(keep)
        with self._cond:
            self._rows = [self._rows[i] for i in order]

    def _drop_aborted(self) -> None:
        with self._cond:
            gone = [r for r in self._waiting if r.aborted]
            if gone:
                self._waiting = deque(r for r in self._waiting if not r.aborted)
        keep = [i for i, r in enumerate(self._rows) if not r.aborted]
        if len(keep) < len(self._rows):
            gone += [r for r in self._rows if r.aborted]
            self._keep(keep)
        for r in gone:
            r.finished = True
            self.counters["aborted"] += 1
            _emit_quietly(r, Output(finish_reason="abort", prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.generated)))

    def _fail(self, requests: list[Request], error: Exception) -> None:
        self.counters["errors"] += 1
        self._cache = running_cache(self.kv_cache)  # a step that failed half-way may have left it inconsistent
        with self._cond:
            self._rows = []
        for r in requests:
            if not r.finished:
                r.finished = True
                _emit_quietly(r, Output(error=f"{type(error).__name__}: {error}"))

    def _fail_alone(self, r: Request, error: Exception) -> None:
        """End one request with ``error``; its row (if running) leaves at the caller's next ``_keep``."""
        self.counters["errors"] += 1
        if not r.finished:
            r.finished = True
            _emit_quietly(r, Output(error=f"{type(error).__name__}: {error}",
                                    prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.generated)))


def _emit_quietly(r: Request, out: Output) -> None:
    """The last word to a request that failed: a callback that fails too has nobody left to tell."""
    try:
        r.emit(out)
    except Exception:
        pass


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """Token ids that end a completion: the generation config's ``eos_token_id`` (one or a list) and the tokenizer's."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for source in (getattr(generation_config, "eos_token_id", None), getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids
