"""``peftkit serve`` as a user runs it: a subprocess, its command line, and SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import openai
import pytest
from serve_utils import Offline, make_model_dir

from peftkit.cli import build_parser, main
from peftkit.commands.serve import config_from, parse_adapters
from peftkit.serve.config import ServeConfig


def test_help_and_defaults():
    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m", "--adapter", "a=x", "--adapter", "b=y", "--max-queue", "9"])
    assert args.adapter == ["a=x", "b=y"]
    # The flags are ServeConfig's fields: unset ones keep its defaults, set ones are typed.
    with pytest.raises(FileNotFoundError, match="Adapter 'a': x has no adapter_config.json"):
        config_from(args)
    args = parser.parse_args(["serve", "--model", "m", "--max-queue", "9", "--dtype", "bfloat16"])
    assert config_from(args) == ServeConfig(model="m", max_queue=9, dtype="bfloat16", api_key=os.environ.get("PEFTKIT_API_KEY"))
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--model", "m", "--port", "http"])
    serve_parser = parser._subparsers._group_actions[0].choices["serve"]
    text = serve_parser.format_help()
    for option in ("--model", "--adapter NAME=DIR", "--host", "--port", "--api-key", "--max-batch-size", "--adapter-root"):
        assert option in text


def test_adapter_specs(tmp_path):
    assert parse_adapters(["a=x/y", str(tmp_path / "task")]) == {"a": "x/y", "task": str(tmp_path / "task")}
    with pytest.raises(ValueError, match="given twice"):
        parse_adapters(["a=x", "a=y"])
    with pytest.raises(ValueError, match="NAME=DIR"):
        parse_adapters(["=x"])


def test_bad_model_or_adapter_is_a_one_line_error(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--adapter", f"a={tmp_path}"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_serve_subprocess_answers_and_stops_cleanly_on_sigterm(tmp_path):
    model_dir, adapters = make_model_dir(tmp_path)
    command = [sys.executable, "-m", "peftkit.cli", "serve", "--model", str(model_dir), "--adapter", f"alpha={adapters['alpha']}",
               "--port", "0", "--api-key", "k", "--log-level", "warning"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if match := re.search(r"on (http://127\.0\.0\.1:\d+/v1)", line):
                break
        else:
            pytest.fail("the server did not start:\n" + "".join(lines))
        with openai.OpenAI(base_url=match.group(1), api_key="k", max_retries=5, timeout=120) as client:
            assert {m.id for m in client.models.list().data} == {"tiny-llama", "alpha"}
            stream = client.completions.create(model="alpha", prompt="hello world", max_tokens=60, temperature=0, stream=True)
            chunks = [next(iter(stream))]
            proc.send_signal(signal.SIGTERM)
            chunks += list(stream)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    offline = Offline(model_dir, adapters, [2])
    assert "".join(c.choices[0].text for c in chunks) == offline.completion("alpha", "hello world", 60)
