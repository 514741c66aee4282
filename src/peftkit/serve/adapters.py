"""Adapters a running server may load: confined to ``--adapter-root``, refused before they touch the
model when they cannot be served, and attached all or nothing.

The server keeps one base model for every client. An adapter that writes into the base weights
(full or selective fine-tuning, a LoRA that trains biases) would change what every other request
computes, so it is refused from its config before anything is attached; an adapter that is attached
and then fails (bad tensors, wrong shapes, a tuner that turns out unable to share a batch) is removed
again by :class:`~peftkit.PeftModel`'s own rollback, which leaves the model as it was found.
"""

from __future__ import annotations

from pathlib import Path

from ..config import PeftConfig
from ..io.files import CONFIG_NAME, WEIGHTS_NAME, load_adapter_config
from ..model import PeftModel
from ..registry import config_from_dict, tuner_for


class Unservable(ValueError):
    """A readable adapter that this server cannot serve next to other adapters."""


class OutsideRoot(PermissionError):
    """A path (or a file it links to) outside the directory adapters may be loaded from."""


def confined(path: str, root: Path) -> Path:
    """``path`` (relative to ``root`` unless absolute), resolved, after checking that it and every file the
    loader reads from it resolve inside ``root``: a folder inside the root whose files are symbolic links
    to files elsewhere is refused like a folder elsewhere. Raises OutsideRoot or ValueError (bad path)."""
    if "\x00" in path:
        raise ValueError("the path contains a NUL byte.")
    given = Path(path)
    directory = (given if given.is_absolute() else root / given).resolve()
    if not directory.is_relative_to(root):
        raise OutsideRoot(f"{path!r} is outside the adapter root {root}.")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        file = directory / name
        if (file.exists() or file.is_symlink()) and not file.resolve().is_relative_to(root):
            raise OutsideRoot(f"{path!r}: {name} links to {file.resolve()}, outside the adapter root {root}.")
    return directory


def read_config(path: str | Path) -> PeftConfig:
    """The adapter's config, validated (ValueError/TypeError says what is wrong), nothing else read."""
    return config_from_dict(load_adapter_config(path), source=str(Path(path) / CONFIG_NAME))


def refusal(config: PeftConfig) -> str | None:
    """Why the server cannot serve adapters with this config, or None when it can."""
    tuner = tuner_for(config)
    kind = type(config).__name__
    if tuner.is_exclusive(config):
        bias = getattr(config, "bias", None)
        what = f"{kind} with bias={bias!r} trains" if bias not in (None, "none") else f"{kind} trains"
        return (f"{what} the base model's own weights, which every request of this server shares; merge it into "
                "a model of its own (peftkit merge) and serve that instead.")
    if not tuner.mixed_batch:
        return f"{kind} adapters cannot run in a batch shared with other adapters, which is how this server runs them."
    return None


def attach(model: PeftModel, name: str, path: str | Path) -> None:
    """Attach the adapter in ``path`` to ``model`` as ``name``. On any error the model is left as it was found."""
    config = read_config(path)
    reason = refusal(config)
    if reason is not None:
        raise Unservable(reason)
    model.load_adapter(path, adapter_name=name)
    try:
        # The config said yes; the attached adapter has the last word (some decide per instance).
        model.check_mixed_batch([name])
    except ValueError as e:
        model.delete_adapter(name)
        raise Unservable(str(e)) from None
