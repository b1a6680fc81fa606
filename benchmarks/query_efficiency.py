"""Query efficiency: explanation attacks against DFME, fair protocol; same as `megex bench`.

python benchmarks/query_efficiency.py --quick --jobs 2   # one victim and seed, 50k and 150k
python benchmarks/query_efficiency.py --jobs 2           # 3 victims x 3 seeds, to 250k
python benchmarks/query_efficiency.py --config benchmarks/configs/svhn.json --data-root DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout without installing: the package lives in src/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from megex.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
