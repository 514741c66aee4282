"""``python -m peftkit.experiments RUN_DIR``: run one entry of a comparison (what ``isolate`` starts)."""

import sys
from pathlib import Path

from .worker import run_entry

if len(sys.argv) != 2:
    raise SystemExit("usage: python -m peftkit.experiments RUN_DIR")
raise SystemExit(0 if run_entry(Path(sys.argv[1]))["status"] == "ok" else 1)
