"""Query efficiency of MEGEX vs DFME (clone accuracy against queries); see megex.bench.

python benchmarks/query_efficiency.py --quick            # one seed, 50k and 150k
python benchmarks/query_efficiency.py --jobs 2           # 3 seeds, 100k to 1M
python benchmarks/query_efficiency.py --config benchmarks/configs/svhn.json --data-root DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout without installing: the package lives in src/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from megex.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
