"""Detection benchmark: do the query monitors flag the attacks, and how often benign keys?
The same as `megex detection`, with the same options.

python benchmarks/detection.py --quick   # one victim, two seeds, 2,000-query streams: minutes
python benchmarks/detection.py           # 3 victims x 5 seeds, 5,000-query streams

Writes benchmarks/results/detection/detection[_quick].json and .md, and a calibration file
per monitor and victim for `megex serve --monitor NAME:calibration=FILE`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout without installing: the package lives in src/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from megex.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["detection", *sys.argv[1:]]))
