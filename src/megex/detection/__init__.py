"""Watching a service's query stream, per API key, for model-extraction traffic.

A :class:`Monitor` (:mod:`.base`) sees what each key sends (images, float32 in [0, 1],
(N, C, H, W)) and what the victim honestly answered (its probabilities, before any defence),
and keeps a small state per key. Its settings are dataclass fields with their help and rule
(:mod:`megex.settings`). :meth:`Monitor.update` turns a batch into measurements of the
monitor's statistic (``queries_seen``, ``statistic``); :meth:`Monitor.observe` does the same
and returns a :class:`Flag` when a key's statistic crosses the threshold (once: the key is
flagged again only after its statistic has stayed on the safe side for `rearm` queries and
crosses again, so that a statistic wavering about the threshold is one flag). Two monitors:

- :class:`PradaMonitor` (:mod:`.prada`): PRADA (Juuti et al., EuroS&P 2019). Natural
  queries lie at distances from each other that look normally distributed; a generator's
  queries (and near-duplicate probes) do not, and a Shapiro-Wilk test on the distances tells
  them apart.
- :class:`OODMonitor` (:mod:`.ood`): how unlike the victim's training data the key's queries
  look to the victim, from its probabilities, averaged over the key's last queries.

Thresholds are chosen on benign traffic (:mod:`.calibration`): :func:`calibrate` replays
benign streams (validation images held out of the victim's training split, never the test
split) and picks the threshold that flags at most a target fraction of them;
:class:`Calibration` is the file a server takes (``megex serve --monitor
prada:calibration=FILE``, read by :func:`build_monitor`).

In-process (:mod:`.streams`): :class:`MonitoredOracle` puts monitors in front of any Oracle
(an attack run under watch), :class:`RecordingOracle` records a run's queries as a
:class:`QueryStream`, and :func:`replay` feeds a recorded stream to a monitor. The
Shapiro-Wilk test needs scipy (the ``data`` extra); nothing else here needs more than torch
and numpy.
"""

from .base import Flag, Measurement, Monitor, first_crossing
from .calibration import Calibration, calibrate, extreme, threshold_for_rate
from .ood import OOD_SCORES, OODMonitor
from .prada import PradaMonitor
from .registry import MONITORS
from .specs import build_monitor
from .streams import MonitoredOracle, QueryStream, RecordingOracle, replay

__all__ = [
    "Calibration",
    "Flag",
    "Measurement",
    "Monitor",
    "MONITORS",
    "MonitoredOracle",
    "OOD_SCORES",
    "OODMonitor",
    "PradaMonitor",
    "QueryStream",
    "RecordingOracle",
    "build_monitor",
    "calibrate",
    "extreme",
    "first_crossing",
    "replay",
    "threshold_for_rate",
]
