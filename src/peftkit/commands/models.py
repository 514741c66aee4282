"""``peftkit models``: the model catalogue (models usable offline) and where they are cached.

  peftkit models list         the catalogue, with what is already converted
  peftkit models path NAME    the local directory of NAME (converting it first if needed), for any tool
"""

from __future__ import annotations

import argparse
import textwrap


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list catalogue models / print a model's local directory", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="the catalogue and what is cached").set_defaults(func=run_list)
    path = actions.add_parser("path", help="print the local directory of a catalogue model (converting it if needed)")
    path.add_argument("name", help="a catalogue name, e.g. smollm2-135m-instruct")
    path.set_defaults(func=run_path)


def run_list(args: argparse.Namespace) -> int:
    from ..hub import CATALOGUE, DEFAULT_MODEL, cache_dir, cached_path, is_cached

    width = max(len(n) for n in CATALOGUE)
    for name, entry in CATALOGUE.items():
        state = f"cached at {cached_path(name)}" if is_cached(name) else "not converted yet (first use takes ~30 s)"
        default = " [default]" if name == DEFAULT_MODEL else ""
        lines = textwrap.wrap(entry.description + default, 100 - width)
        print(f"{name:<{width}}  " + f"\n{'':<{width}}  ".join(lines + [state]))
    print(f"cache: {cache_dir()} (set PEFTKIT_CACHE to move it)")
    return 0


def run_path(args: argparse.Namespace) -> int:
    from ..hub import CATALOGUE, ensure_cached

    if args.name not in CATALOGUE:
        raise ValueError(f"{args.name!r} is not in the catalogue; known: {', '.join(CATALOGUE)}.")
    print(ensure_cached(args.name))
    return 0
