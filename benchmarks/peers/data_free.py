"""Our data-free attacks beside public implementations of DFME, DisGUIDE and dual students, on
one victim.

One run of this script steals one of our victims with every implementation below, each to
the largest budget, evaluates every clone on our test split at each budget on the way, and
writes a side-by-side table (clone test accuracy per budget, queries per second):

- ours (megex): ``dfme-paper`` (DFME as published), ``disguide-paper`` and
  ``dual-students-paper`` (ours with the settings of each paper's authors' run script), and
  ``dfme``, ``disguide`` and ``dual-students`` with the benchmark's searched settings from
  ``--tuned`` (a method the file does not hold yet is reported as not run, and run by a
  later invocation), and ``dfme-published``, ``disguide-published`` and
  ``dual-students-published``, the search's trial of each paper's searched knobs in the
  benchmark's shared settings; each through ``megex.engine.run`` with ``eval_at`` = the
  budgets (``data_free_harness/ours.py``);
- mebench (caumin/model-extraction-benchmark, a checkout given by ``--mebench``):
  ``mebench.attackers.dfme.DFME`` and, where the checkout has it,
  ``mebench.attackers.disguide.DisGUIDE``, each driven by its own ``run(ctx)``
  (``data_free_harness/mebench_peer.py``);
- the DisGUIDE authors' code (lin-tan/disguide, a checkout given by ``--disguide``): its
  ``train.train_epoch_ensemble`` with the arguments of its ``cli_parser.parse_args`` for the
  run script's flags (``disguide``), or for its DFME experiment (``dfme``)
  (``data_free_harness/authors_peer.py``);
- the dual students authors' code (James-Beetham/dual_students, a checkout given by
  ``--dual-students``): its ``train.train`` with the arguments of the parser in its
  ``train.main()`` for the flags of its run script ``run_cifar_ds.sh``
  (``data_free_harness/dual_students_peer.py``).

The peers' code is imported from the given folders, never copied
(``data_free_harness/peer_imports.py``). What is adapted, only at the boundary, is recorded
in each row's ``adapted`` list and said in the docstring of the module that adapts it: the
victim, ours behind a module that counts every image it is shown and refuses a request that
would pass the budget (``metering.py``), in each peer's own interface; the students, our
clone for the victim's image size (``default_clone_arch``: LeNet-5 at 28x28) in every
implementation, so that the table compares the attacks and not the architectures (the
peers' ResNet-18-8x students would take hours per 10k queries on a CPU); the generators are
each implementation's own; evaluation, on our test split in each peer's input convention, of
the model the peer reports, at each budget; and packages that the called functions never
use, empty stand-ins where they are not installed.

Budgets: each peer runs to the largest budget; the smaller ones are read on the way, as ours
are. With ``--schedule constant`` (the default) no implementation decays its learning rate,
so a budget read on the way is what a run of that budget gives; ``--schedule published``
uses each one's decays at fractions of the largest budget.

Every finished (implementation, method, seed) row is a JSON file under ``<out>/runs/`` and is
not run again; the table (``<out>/data_free_peers.md`` and ``.json``) is rebuilt from them.

    python benchmarks/peers/data_free.py --victim FILE [--dataset fashion-mnist]
        [--budgets 25000 50000 100000] [--seeds 0 1] [--mebench PATH] [--disguide PATH]
        [--dual-students PATH] [--out DIR] [--schedule constant|published] [--tuned FILE]
        [--test-images N]
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Run from a checkout without installing: megex lives in src/, the harness beside this file.
sys.path.insert(0, str(HERE.parents[1] / "src"))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from data_free_harness.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
