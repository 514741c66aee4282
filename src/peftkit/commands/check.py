"""``peftkit check``: read an adapter directory and say whether it loads in peftkit and in vLLM, and why not.

Example:
  peftkit check --adapter runs/lora

Exit status 0 when vLLM will load the adapter (conditions such as a --max-lora-rank above vLLM's default are
printed), 1 when it will not (the reasons are printed), 2 when the directory is not an adapter peftkit can read.
The rules are vLLM's own, read from its source: see peftkit/io/vllm.py.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check an adapter directory (loads in peftkit? in vLLM?)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="adapter directory (Hugging Face PEFT format)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io.files import CONFIG_NAME, load_adapter_config, load_adapter_tensors
    from ..io.vllm import vllm_notes, vllm_problems
    from ..registry import config_from_dict

    data = load_adapter_config(args.adapter)
    config_from_dict(dict(data), source=f"{args.adapter}/{CONFIG_NAME}")  # raises (exit 2) if peftkit cannot read it
    tensors = load_adapter_tensors(args.adapter)
    count = sum(t.numel() for t in tensors.values())
    print(f"{args.adapter}: {data.get('peft_type')} adapter, {len(tensors)} tensors, {count:,d} parameters, "
          f"task {data.get('task_type')}, base model {data.get('base_model_name_or_path')}")
    print("peftkit: loads")
    problems = vllm_problems(data, tensors)
    if not problems:
        print("vLLM: loads (as a LoRA adapter beside the base model)")
        for note in vllm_notes(data, tensors):
            print(f"  - {note}")
        return 0
    print("vLLM: will not load it:")
    for problem in problems:
        print(f"  - {problem}")
    print("  (merge it into the base model with `peftkit merge` and serve the merged model, or retrain without these options)")
    return 1
