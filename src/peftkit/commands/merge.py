"""``peftkit merge``: fold an adapter into its base model and save the result as an ordinary model.

Example:
  peftkit merge --adapter runs/lora --output runs/lora-merged

The merged model has the base model's size and speed (no adapter at inference) and loads with plain
transformers: AutoModelForCausalLM.from_pretrained("runs/lora-merged").

On a quantized base (an adapter trained with --quantize), the base is dequantized and the adapter merged in
fp32; --dtype chooses what is written (float32 or bfloat16), --requantize writes the merged model quantized as
the base was. Either way it prints how far the merged model's outputs are from the unmerged adapter's on a fixed
probe text (for an ordinary base: float rounding only).

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
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the merged model "
                   "written from a quantized base (default: float32)")
    p.add_argument("--requantize", action="store_true", help="on a quantized base: quantize the merged model again as the "
                   "base was loaded (its size, with quantization error on the merged weights)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..evaluate import load_for_inference
    from ..hub import resolve_model
    from ..io.files import staged_directory, tensor_bytes
    from ..quantize import quantized_kind

    output = Path(args.output)
    check_output(output, {"base model": args.model or "", "adapter": args.adapter}, args.overwrite)  # before loading
    model, tokenizer, model_name = load_for_inference(args.model, args.adapter, torch.device("cpu"), args.check_values)
    check_output(output, {"base model": resolve_model(model_name)}, args.overwrite)  # the one the adapter names
    quantized = quantized_kind(model.get_base_model())
    if not quantized and (args.requantize or args.dtype != "float32"):
        raise ValueError("--requantize and --dtype apply to an adapter trained on a quantized base (--quantize); "
                         "this base model is not quantized.")
    probe = probe_inputs(model, tokenizer)
    with torch.no_grad():
        before = model(**probe).logits.float()
    merged = model.merge_and_unload(requantize=args.requantize, dtype=getattr(torch, args.dtype))
    with torch.no_grad():
        after = merged(**probe).logits.float()
    diff = (after - before).abs().max().item()
    agree = (after.argmax(-1) == before.argmax(-1)).float().mean().item()
    with staged_directory(output, replace=True, size=tensor_bytes(merged.state_dict().values())) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    kind = f" (from a {quantized} base: {'re-quantized' if args.requantize else 'dequantized to ' + args.dtype})" if quantized else ""
    print(f"peftkit merge: wrote {type(merged).__name__}{kind} to {args.output}")
    print(f"peftkit merge: merged vs unmerged on a probe text ({probe['input_ids'].shape[1]} tokens): max |logit "
          f"difference| {diff:.3g} (logits span {before.max().item() - before.min().item():.3g}), same top token at {100 * agree:.1f}% of positions")
    return 0


PROBE_TEXT = "Summarize the following conversation. #Person1#: Can you help me plan a trip tomorrow? #Person2#: Sure."


def probe_inputs(model, tokenizer) -> dict:
    """A fixed short input on which merged and unmerged outputs are compared."""
    import torch

    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]
    device = next(model.parameters()).device
    ids = ids.to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs


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
