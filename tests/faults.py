"""Fault injection for the tests: count every place peftkit (and the libraries it calls) writes a file, and
at the k-th one raise ``OSError(ENOSPC)`` (a full disk) or SIGKILL the process (kill -9).

Write sites: ``open`` for writing, ``os.open`` creating a file, safetensors' ``save_file`` (written from
Rust, so it is wrapped by name where it is imported), and the renames that put a file in place. A kill at
a ``save_file`` site first writes half of the file, so torn files are part of what is tested.
"""

from __future__ import annotations

import builtins
import errno
import os
import signal
from contextlib import contextmanager
from pathlib import Path

_real_open, _real_os_open, _real_replace, _real_rename = builtins.open, os.open, os.replace, os.rename


class Injector:
    """``events`` lists ``(kind, path)`` of every write site reached; ``fail_at`` (1-based) is where the
    fault strikes; ``action`` is ``"enospc"`` or ``"kill"``."""

    def __init__(self, fail_at: int = 0, action: str = "enospc") -> None:
        self.fail_at, self.action, self.events = fail_at, action, []

    def hit(self, kind: str, path, before_kill=None) -> None:
        self.events.append((kind, str(path)))
        if len(self.events) != self.fail_at:
            return
        if self.action == "kill":
            if before_kill is not None:
                before_kill()
            os.kill(os.getpid(), signal.SIGKILL)
        if kind not in ("rename", "replace"):  # a full disk does not stop a rename
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@contextmanager
def inject(injector: Injector):
    """Route the write sites through ``injector`` for the duration of the block."""
    import safetensors.torch
    import transformers.modeling_utils

    import peftkit.io.files as files

    real_save = safetensors.torch.save_file

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            injector.hit("open", file)
        return _real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            injector.hit("create", path)
        return _real_os_open(path, flags, *args, **kwargs)

    def save_file(tensors, filename, *args, **kwargs):
        def half_written():
            real_save(tensors, filename, *args, **kwargs)
            size = os.path.getsize(filename)
            os.truncate(filename, size // 2)

        injector.hit("save_file", filename, before_kill=half_written)
        return real_save(tensors, filename, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        injector.hit("replace", dst)
        return _real_replace(src, dst, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        injector.hit("rename", dst)
        return _real_rename(src, dst, *args, **kwargs)

    patches = [(builtins, "open", open_), (os, "open", os_open), (os, "replace", replace), (os, "rename", rename),
               (safetensors.torch, "save_file", save_file), (files, "save_file", save_file),
               (transformers.modeling_utils, "safe_save_file", save_file)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield injector
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def run_cli(argv: list[str], fail_at: int, action: str, events_file: str) -> None:
    """Child-process entry: run ``peftkit argv`` with a fault at write site ``fail_at`` (0: none), then
    write the write sites it reached to ``events_file``. A kill ends the process before that."""
    import json

    from peftkit.cli import main

    injector = Injector(fail_at, action)
    with inject(injector):
        code = main(argv)
    Path(events_file).write_text(json.dumps(injector.events))
    raise SystemExit(code)  # the exit status of the child process


def leftovers(root: Path) -> list[str]:
    """Temporary files and staging folders under ``root`` (what an interrupted write leaves behind)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.endswith(".tmp") or ".staging-" in p.name or ".old-" in p.name or p.name.startswith(".tmp-step-"))
