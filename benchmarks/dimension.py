"""The query-efficiency benchmark at every input size, then one table across sizes; the
same as `megex input-size`.

python benchmarks/dimension.py --quick --jobs 2   # one victim and seed per size, 25k and 50k
python benchmarks/dimension.py --jobs 2           # 3 victims x 3 seeds per size, to 100k
python benchmarks/dimension.py --sizes 14 28      # some sizes only
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout without installing: the package lives in src/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from megex.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["input-size", *sys.argv[1:]]))
