"""Files on disk, complete or absent: atomic writes, whole-folder outputs, safe and strict adapter reads.

Only safetensors are read; a pickled ``adapter_model.bin`` is refused (loading a pickle can run code).

* A file is written to a temporary name beside it (``.NAME.PID-XXXX.tmp``) and renamed into place, so an
  interrupted save leaves the previous file (or none), never half a file.
* An output folder (an adapter, a merged model, a run's final save, an evaluation) is written into a
  staging folder beside it (``.NAME.staging-PID``) and takes its place as a whole: a folder that exists
  holds everything, or the old contents. A folder that already holds other files (a run folder with its
  checkpoints) receives the staged files one by one, the files that mark it complete (``run.json``,
  ``config.json``) last.
* A kill -9 leaves such temporary files and folders behind; the next run that writes to the same place
  removes them (only those of processes that are gone), or finishes a move that had been committed.
* Files get the usual mode (0666 less the umask): adapters and models are artifacts to share.
* A full disk is reported as :class:`DiskFull`, naming the path and about how much space it needed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WHOLE_MODEL_NAME = "model.safetensors"  # a whole model's weights, as transformers writes them
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")

# Names of what an interrupted write leaves behind, each with the id of the process that wrote it.
_TMP_FILE = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.tmp$")
_STAGING = re.compile(r"^\.(.+)\.staging-(\d+)$")
_OLD = re.compile(r"^\..+\.old-(\d+)$")
_COMMITTED_MARK = re.compile(r"^\..+\.staging-(\d+)\.committed$")
_COMMITTED = ".committed"  # beside a staging folder: its contents are complete, finish moving them in


class DiskFull(OSError):
    """The disk (or quota) ran out while writing ``filename``; the message says how much was needed."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # safetensors and tokenizers write from Rust and report the OS error inside their own exception's text.
    text = str(error)
    return isinstance(error, Exception) and ("No space left on device" in text or "StorageFull" in text or "os error 28" in text)


def disk_full_error(path: str | os.PathLike, needed: int | None, written: str | os.PathLike | None = None) -> DiskFull:
    """A :class:`DiskFull` naming ``path`` (and the file being written inside it), ``needed`` and what is free."""
    path = Path(path)
    free = _free_bytes(path)
    where = f"{path}" + (f" ({Path(written).name})" if written is not None and Path(written).name != path.name else "")
    need = f"it needs about {_size(needed)}" if needed else "it needs more space"
    message = (f"No space left on the device while writing {where}: {need}"
               + (f", {_size(free)} is free there" if free is not None else "")
               + ". Nothing half-written was kept; free some space or write elsewhere, then run again.")
    return DiskFull(errno.ENOSPC, message, str(path))


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _size(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# --- single files ------------------------------------------------------------------------------------
def temporary_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], size: int | None = None) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path`` (same directory, same filesystem).
    ``size``: about how many bytes ``write`` writes, for the message if the disk is full."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        write(str(tmp))
        # The usual mode for a new file; some writers (safetensors) create theirs with 0o600.
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        _unlink(tmp)
        if is_disk_full(e) and not isinstance(e, DiskFull):
            raise disk_full_error(path, size) from None
        raise


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    data = text.encode("utf-8")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write, size=len(data))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a log record). A kill can cut the last line short; readers drop a torn last line."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(path, len(line) + 1) from None
        raise


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses tensors that share memory or are non-contiguous views. Copy only those: a full
    # fine-tuning checkpoint is the whole model, and copying every tensor would double it while saving.
    plain: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        if value.untyped_storage().data_ptr() in storages:
            value = value.clone()
        storages.add(value.untyped_storage().data_ptr())
        plain[key] = value
    atomic_write(path, lambda tmp: save_file(plain, tmp, metadata=metadata or {"format": "pt"}), size=tensor_bytes(plain.values()))


# --- whole folders -----------------------------------------------------------------------------------
@contextmanager
def staged_directory(
    final: str | os.PathLike, last: tuple[str, ...] = (), replace: bool = False, size: int | None = None
) -> Iterator[Path]:
    """Yield an empty staging folder beside ``final``; when the block ends, the staged files become ``final``.

    ``final`` missing, or holding only files the staging folder replaces (an earlier run of the same
    command), or ``replace``: the staging folder takes its place by renames, so ``final`` is whole at
    every moment (between the two renames it is absent).
    ``final`` holding other files too (a run folder with checkpoints): the files are moved in one by one,
    ``last`` (the files that say the folder is complete) removed first and moved in last; if the process
    dies meanwhile, the next :func:`remove_stale` finishes the move. On any error the staging folder is
    removed and ``final`` is left as it was; a full disk raises :class:`DiskFull` naming ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent)
    staging = final.parent / f".{final.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()  # mode 0o777 less the umask
    try:
        yield staging
        _publish(staging, final, last, replace)
    except BaseException as e:
        written = _tree_bytes(staging)
        shutil.rmtree(staging, ignore_errors=True)
        _unlink(_committed(staging))
        if is_disk_full(e):
            raise disk_full_error(final, max(size or 0, written) or None, getattr(e, "filename", None)) from None
        raise


def remove_stale(directory: str | os.PathLike) -> list[Path]:
    """Clean up after processes that were killed while writing in ``directory``: delete their temporary
    files and uncommitted staging folders, finish the moves of committed ones. Returns what it touched."""
    directory = Path(directory)
    touched: list[Path] = []
    if not directory.is_dir():
        return touched
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if not name.startswith("."):
            continue
        tmp, staging, old, mark = (pattern.match(name) for pattern in (_TMP_FILE, _STAGING, _OLD, _COMMITTED_MARK))
        match = tmp or staging or old or mark
        if match is None or _alive(int(match.groups()[-1])):
            continue
        if mark and (directory / name.removesuffix(_COMMITTED)).exists():
            continue  # handled with its staging folder
        if staging and entry.is_dir() and _committed(entry).is_file():
            _publish(entry, directory / staging.group(1), *_read_committed(entry))  # finish the move
        elif entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            _unlink(_committed(entry))
        else:
            _unlink(entry)
        touched.append(entry)
    return touched


def _publish(staging: Path, final: Path, last: tuple[str, ...], replace: bool) -> None:
    _fsync_tree(staging)
    committed = _committed(staging)
    # From here on, a later run finishes the move instead of discarding the staging folder.
    atomic_write_text(committed, json.dumps({"last": list(last), "replace": replace}))
    staged = sorted(os.listdir(staging))
    if not final.exists():
        os.rename(staging, final)  # the whole folder appears at once
    elif replace or set(os.listdir(final)) <= set(staged):  # or nothing but an earlier version of this output
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        for name in last:
            _unlink(final / name)  # the folder stops looking complete before any file of it changes
        for name in [n for n in staged if n not in last] + [n for n in last if n in staged]:
            target = final / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(staging / name, target)
        shutil.rmtree(staging, ignore_errors=True)
    _fsync_dir(final.parent)
    _unlink(committed)


def _committed(staging: Path) -> Path:
    return staging.parent / (staging.name + _COMMITTED)


def _read_committed(staging: Path) -> tuple[tuple[str, ...], bool]:
    try:
        info = json.loads(_committed(staging).read_text(encoding="utf-8"))
        return tuple(info["last"]), bool(info["replace"])
    except (OSError, ValueError, KeyError, TypeError):
        return (), False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def _fsync(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not sync directories; the renames are still atomic
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            _fsync(os.path.join(dirpath, f))
        _fsync_dir(Path(dirpath))


def _unlink(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- adapters ----------------------------------------------------------------------------------------
def save_adapter_files(directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write one adapter: weights first, then the config that describes them."""
    directory = Path(directory)
    save_tensors(directory / WEIGHTS_NAME, tensors)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"Adapter directory {str(directory)!r} does not exist.")
    if not path.is_file():
        if (directory / WHOLE_MODEL_NAME).is_file():
            # What transformers.Trainer and TRL's trainers write for a model they do not take for a peft.PeftModel
            # (they test isinstance): the whole module's state dict. Nothing on peftkit's side can change that.
            raise FileNotFoundError(
                f"{directory} holds {WHOLE_MODEL_NAME} but no {CONFIG_NAME}: a whole-model checkpoint, as transformers' "
                "Trainer and TRL's trainers write for any model that is not a peft.PeftModel, not an adapter. Train "
                "peftkit models with peftkit.trainers.Trainer / SFTTrainer / DPOTrainer (the same classes, one changed "
                "import) to get adapter checkpoints. To rescue this one: build the same peftkit model, "
                f"model.load_state_dict(safetensors.torch.load_file('{directory / WHOLE_MODEL_NAME}')), then "
                "model.save_pretrained(DIR)."
            )
        raise FileNotFoundError(f"{path} is missing: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}.")
    return data


def load_adapter_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickles = [n for n in PICKLE_NAMES if (directory / n).exists()]
        hint = (
            f" Found {pickles[0]}, a pickle, which peftkit does not load because unpickling can run code; "
            "re-save it as safetensors with the tool that wrote it."
            if pickles
            else ""
        )
        raise FileNotFoundError(f"{path} is missing.{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}).") from None


def check_adapter_values(tensors: dict[str, torch.Tensor], directory: str | os.PathLike) -> None:
    """Refuse weights no training writes: integer (or boolean) tensors, and NaN/inf values, which would
    turn every output of the model into NaN. ``check_values=False`` / ``--no-check-values`` skip this."""
    path = Path(directory) / WEIGHTS_NAME
    for key, value in tensors.items():
        if not (value.is_floating_point() or value.is_complex()):
            raise ValueError(f"{path}: {key} holds {str(value.dtype).removeprefix('torch.')} values; adapter weights are "
                             "floating point, so this is not an adapter's weights file. To load it anyway, pass "
                             "check_values=False (--no-check-values).")
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise ValueError(f"{path}: {key} holds {bad} NaN/inf value(s) of {value.numel()}; the model would put out "
                             "NaN. The training that wrote it probably diverged. To load it anyway, pass "
                             "check_values=False (--no-check-values).")


def load_adapter_files(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return load_adapter_config(directory), load_adapter_tensors(directory)
