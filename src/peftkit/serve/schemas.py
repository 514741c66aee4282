"""OpenAI request bodies (validated by pydantic) and the response/chunk dictionaries the server sends.

Fields follow the OpenAI API reference. Fields the server cannot honour are refused with a 400 that
names them (rather than silently ignored) when set to anything but their neutral value; fields it
does not know are ignored, as OpenAI-compatible servers do, so newer clients keep working.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .engine import MIN_TEMPERATURE, SEED_RANGE
from .errors import bad_request


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Clients send ``"temperature": null`` for "not set"; let the defaults above apply.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("temperature")
    @classmethod
    def _temperature_is_greedy_or_usable(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"use 0 for greedy decoding or a temperature of at least {MIN_TEMPERATURE} "
                             "(smaller ones are greedy in all but name and overflow when logits are divided by them)")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise bad_request(f"stop takes at most 4 strings, got {len(stop)}.", "stop")
        return tuple(stop)

    def refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported by this server; leave it at 0.", name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server.", "logit_bias")


class CompletionRequest(_Common):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings, token ids, or lists of token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise bad_request("echo is not supported by this server.", "echo")
        if self.logprobs is not None:
            raise bad_request("logprobs is not supported by this server.", "logprobs")
        if self.best_of not in (None, 1):
            raise bad_request("best_of is not supported by this server; use n.", "best_of")
        if self.suffix:
            raise bad_request("suffix is not supported by this server.", "suffix")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt must not be empty.", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise bad_request(f"Only text content parts are supported, got {part.type!r}.", "messages")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``. ``max_completion_tokens`` is the newer name of ``max_tokens``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs or self.top_logprobs:
            raise bad_request("logprobs is not supported by this server.", "logprobs")
        if self.tools:
            raise bad_request("tools are not supported by this server.", "tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise bad_request("Only response_format {'type': 'text'} is supported.", "response_format")

    def conversation(self) -> list[dict[str, str]]:
        """Messages as chat templates expect them: ``[{"role", "content"}]`` (``developer`` becomes ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class LoadLoraRequest(BaseModel):
    """``POST /v1/load_lora_adapter``, as vLLM names it."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1, max_length=4096)

    @field_validator("lora_name", "lora_path")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain a NUL byte")
        return value


class UnloadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


# --- responses -------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, created: int, texts: list[str], reasons: list[str | None], use: dict) -> dict:
    choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices, "usage": use}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, reason: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}


def chat_completion(rid: str, model: str, created: int, texts: list[str], reasons: list[str | None], use: dict) -> dict:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
        for i, (t, r) in enumerate(zip(texts, reasons))
    ]
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices, "usage": use}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, reason: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def model_card(name: str, root: str, parent: str | None) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "peftkit", "root": root, "parent": parent}
