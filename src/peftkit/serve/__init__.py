"""Serve many adapters of one base model behind an OpenAI-compatible HTTP API.

    peftkit serve --model path/to/model --adapter summarize=out/summarize --adapter qa=out/qa

``engine.py`` batches concurrent requests for different adapters into one forward pass per
decoding step (continuous batching over :meth:`peftkit.PeftModel.forward` with ``adapter_names``);
``app.py`` is the FastAPI app in front of it. Needs the ``serve`` extra (fastapi, uvicorn).
"""

from .config import ServeConfig
from .engine import Engine, Output, Request, SamplingParams

__all__ = ["Engine", "Output", "Request", "SamplingParams", "ServeConfig"]
