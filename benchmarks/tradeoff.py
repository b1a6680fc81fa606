"""Defences: explanation utility against the clone accuracy they leave; same as `megex tradeoff`.

python benchmarks/tradeoff.py --quick --jobs 2   # one victim and seed, three defences
python benchmarks/tradeoff.py --jobs 2           # the full grid (resumes where it stops)
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout without installing: the package lives in src/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from megex.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["tradeoff", *sys.argv[1:]]))
