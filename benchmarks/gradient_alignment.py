"""How well DFME's zeroth-order gradient aligns with the exact one at each input size, against
sqrt(m / d); same as `megex gradient-alignment`.

python benchmarks/gradient_alignment.py                      # every size, m = 1, 2, 5, 10, 20
python benchmarks/gradient_alignment.py --sizes 14 28 --train-queries 0
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout without installing: the package lives in src/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from megex.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["gradient-alignment", *sys.argv[1:]]))
