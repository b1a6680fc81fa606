"""The tuning search behind the benchmark's settings; same as `megex tune`.

python benchmarks/tune.py --jobs 2          # 20 trials per method at 100k queries; resumes
python benchmarks/tune.py --methods dfme    # one method's study only
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout without installing: the package lives in src/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from megex.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["tune", *sys.argv[1:]]))
