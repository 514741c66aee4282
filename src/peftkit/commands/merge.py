"""``peftkit merge``: fold an adapter into its base model and save the result as an ordinary model.

Example:
  peftkit merge --adapter runs/lora --output runs/lora-merged

The merged model has the base model's size and speed (no adapter at inference) and loads with plain
transformers: AutoModelForCausalLM.from_pretrained("runs/lora-merged").

The merged model is written beside --output and renamed into place when complete, so --output holds the
whole model or nothing. It refuses to write into the base model's or the adapter's own folder, and into a
folder that is not empty unless --overwrite is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge an adapter into its base model", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model (directory, hub id or catalogue name); default: the one "
                   "recorded in the adapter's adapter_config.json")
    p.add_argument("--adapter", required=True, help="adapter directory (Hugging Face PEFT format)")
    p.add_argument("--output", required=True, help="directory for the merged model and its tokenizer (new or empty; "
                   "see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace what --output holds (it is replaced as a whole, "
                   "once the merged model is complete)")
    p.add_argument("--no-check-values", dest="check_values", action="store_false", help="load adapter weights even "
                   "if they hold NaN/inf or integers (refused by default: a diverged run, or not an adapter)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..evaluate import load_for_inference
    from ..hub import resolve_model
    from ..io.files import staged_directory, tensor_bytes

    output = Path(args.output)
    check_output(output, {"base model": args.model or "", "adapter": args.adapter}, args.overwrite)  # before loading
    model, tokenizer, model_name = load_for_inference(args.model, args.adapter, torch.device("cpu"), args.check_values)
    check_output(output, {"base model": resolve_model(model_name)}, args.overwrite)  # the one the adapter names
    merged = model.merge_and_unload()
    with staged_directory(output, replace=True, size=tensor_bytes(merged.state_dict().values())) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    print(f"peftkit merge: wrote {type(merged).__name__} to {args.output}")
    return 0


def check_output(output: Path, inputs: dict[str, str], overwrite: bool) -> None:
    """Refuse an --output that is (or contains) an input folder, or that holds files, without --overwrite."""
    target = output.expanduser().resolve()
    for what, where in inputs.items():
        source = Path(where).expanduser()
        if source.is_dir() and (target == source.resolve() or target in source.resolve().parents):
            raise ValueError(f"--output {output} would overwrite the {what} it merges ({where}); choose another folder.")
    if output.is_file():
        raise ValueError(f"--output {output} is a file; give a folder for the merged model.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"--output {output} is not empty; add --overwrite to replace its contents, or choose a new folder.")
