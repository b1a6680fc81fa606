"""Query-stream monitors: PRADA's procedure, the OOD window, flags, state, calibration."""

from __future__ import annotations

import inspect
import io
import json
import math

import numpy as np
import pytest
import torch

from megex import LocalOracle
from megex.detection import (
    MONITORS,
    Calibration,
    Measurement,
    MonitoredOracle,
    OODMonitor,
    PradaMonitor,
    QueryStream,
    RecordingOracle,
    build_monitor,
    calibrate,
    first_crossing,
    replay,
    threshold_for_rate,
)

pytest.importorskip("scipy")

torch.set_num_threads(1)


def one_hot(classes, k: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(classes), k).float()


def points(*xy) -> torch.Tensor:
    """2-pixel 'images' (1, 1, 2): distances are plain 2-D distances."""
    return torch.tensor(xy, dtype=torch.float32).view(-1, 1, 1, 2)


def natural_stream(n: int, seed: int, dims: int = 64, classes: int = 3) -> QueryStream:
    """Independent draws: their nearest-neighbour distances look normal."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 1, dims, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    return QueryStream(images, one_hot(labels, classes))


def probing_stream(n: int, seed: int, dims: int = 64, classes: int = 3) -> QueryStream:
    """DFME-like: each point followed by a tiny perturbation of itself."""
    base = natural_stream(n // 2, seed, dims, classes)
    gen = torch.Generator().manual_seed(seed + 1000)
    probes = (base.images + 1e-3 * torch.randn(base.images.shape, generator=gen)).clamp(0, 1)
    images = torch.stack([base.images, probes], 1).flatten(0, 1)
    probs = base.probabilities.repeat_interleave(2, 0)
    return QueryStream(images, probs)


def test_prada_growing_sets_follow_the_paper():
    monitor = PradaMonitor(threshold=None, projection_dim=0)
    # Class 0: (0,0) starts the set; (3,0) is 3 away (> T=0) and joins; T = max(0, mean -
    # std of [0, 3]) = 0; (3,1) is 1 away and joins, T = mean - std of [0, 3, 1]; (3,1.05)
    # is 0.05 away, below T: it stays out. Class 1's first query only starts its set.
    x = points((0, 0), (3, 0), (3, 1), (3, 1.05), (9, 9))
    monitor.update("k", x, one_hot([0, 0, 0, 0, 1]))
    state = monitor._keys["k"]
    growing = state.sets[0]
    assert len(growing.members) == 3 and len(state.sets[1].members) == 1
    admitted = np.array([0.0, 3.0, 1.0])
    assert growing.threshold == pytest.approx(admitted.mean() - admitted.std())
    distances, classes = state.recent()
    np.testing.assert_allclose(distances, [3.0, 1.0, 0.05], rtol=1e-5)
    assert classes.tolist() == [0, 0, 0] and monitor.queries_seen("k") == 5


def test_prada_measures_the_same_whatever_the_batches():
    stream = probing_stream(600, seed=0)  # crosses the 256-query chunks
    whole = replay(PradaMonitor(threshold=None, max_stored_per_class=40), stream, batch_size=600)
    ones = replay(PradaMonitor(threshold=None, max_stored_per_class=40), stream, batch_size=1)
    odd = replay(PradaMonitor(threshold=None, max_stored_per_class=40), stream, batch_size=37)
    assert len(whole) > 10 and [m.queries_seen for m in whole] == [m.queries_seen for m in ones]
    np.testing.assert_allclose([m.statistic for m in whole], [m.statistic for m in ones])
    np.testing.assert_allclose([m.statistic for m in whole], [m.statistic for m in odd])


def test_prada_tells_probing_from_independent_queries():
    for seed in range(3):
        natural = replay(PradaMonitor(threshold=None), natural_stream(400, seed))
        probing = replay(PradaMonitor(threshold=None), probing_stream(400, seed))
        # The test starts once more than 100 distances are kept (queries 110 and on).
        assert natural[0].queries_seen >= 100 and probing[0].queries_seen >= 100
        assert min(m.statistic for m in natural) > 0.95
        hit = first_crossing(probing, 0.9, "below")
        assert hit is not None and hit.queries_seen <= 150


def test_prada_bounds_its_memory():
    monitor = PradaMonitor(threshold=None, max_stored_per_class=5, max_distances=150)
    monitor.update("k", natural_stream(400, 0).images, natural_stream(400, 0).probabilities)
    state = monitor._keys["k"]
    assert all(len(s.members) <= 5 for s in state.sets.values())
    assert len(state.recent()[0]) == 150 and state.stored > 150
    # Large images are compared in a random projection of projection_dim dimensions.
    big = torch.rand(20, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    projected = PradaMonitor(threshold=None, projection_dim=32)
    projected.update("k", big, one_hot([0] * 20))
    assert projected._keys["k"].sets[0].members.shape[1] == 32


def test_ood_scores_and_window_means():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(OODMonitor(score="msp").scores(probs.double().numpy()),
                               [0.0, 0.5, 2 / 3])  # fmt: skip
    np.testing.assert_allclose(OODMonitor(score="entropy").scores(probs.double().numpy()),
                               [0.0, math.log(2) / math.log(3), 1.0], atol=1e-12)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(50, 4, generator=gen), 1)
    x = torch.rand(50, 1, 2, 2, generator=gen)
    scores = 1 - p.max(1).values.double().numpy()
    want = [scores[i - 10 : i].mean() for i in range(10, 51)]
    for batch in (1, 7, 50):
        got = replay(OODMonitor(window=10), QueryStream(x, p), batch_size=batch)
        assert [m.queries_seen for m in got] == list(range(10, 51))
        np.testing.assert_allclose([m.statistic for m in got], want)


def test_a_key_is_flagged_once_per_crossing_and_keys_are_apart():
    sure, unsure = [0.98, 0.01, 0.01], [0.4, 0.3, 0.3]
    rows = [sure, sure, unsure, unsure, unsure, sure, sure, sure, unsure, unsure]
    probs = torch.tensor(rows)
    x = torch.rand(len(rows), 1, 2, 2)
    monitor = OODMonitor(threshold=0.4, window=2, rearm=2)
    flags = []
    for i in range(len(rows)):
        flags += monitor.observe("a", x[i : i + 1], probs[i : i + 1])
        assert monitor.observe("b", x[i : i + 1], torch.tensor([sure])) == []
    # Scores 0.02 (sure) and 0.6 (unsure); window means past 0.4 at queries 4 and 5, safe
    # from 6 (re-armed at 8), past it again at 10: two flags.
    assert [f.queries_seen for f in flags] == [4, 10]
    # Not re-armed: one flag for both crossings.
    patient = OODMonitor(threshold=0.4, window=2, rearm=5)
    assert [f.queries_seen for f in patient.observe("a", x, probs)] == [4]
    first = flags[0]
    assert (first.key, first.monitor, first.threshold) == ("a", "ood", 0.4)
    assert first.statistic == pytest.approx(0.6) and first.time > 0
    assert monitor.is_flagged("a") and not monitor.is_flagged("b")
    assert monitor.queries_seen("a") == monitor.queries_seen("b") == len(rows)


@pytest.mark.parametrize("make", [lambda: PradaMonitor(threshold=0.9), lambda: OODMonitor(0.5)])
def test_state_dict_continues_a_stream_exactly(make):
    stream = probing_stream(500, seed=3)
    whole = replay(make(), stream)
    first_half = QueryStream(stream.images[:230], stream.probabilities[:230])
    second_half = QueryStream(stream.images[230:], stream.probabilities[230:])
    before = make()
    part = replay(before, first_half)
    buffer = io.BytesIO()
    torch.save(before.state_dict(), buffer)
    buffer.seek(0)
    after = make()
    after.load_state_dict(torch.load(buffer, weights_only=True))
    part += replay(after, second_half)
    assert [m.queries_seen for m in part] == [m.queries_seen for m in whole]
    np.testing.assert_allclose([m.statistic for m in part], [m.statistic for m in whole])
    # A monitor with other settings refuses the state.
    changed = type(before)(threshold=None, **{**before.params(), **_other_setting(before)})
    with pytest.raises(ValueError, match="settings"):
        changed.load_state_dict(before.state_dict())


def _other_setting(monitor) -> dict:
    return {"test_every": 5} if monitor.name == "prada" else {"window": 7}


def test_threshold_for_rate_flags_at_most_the_target():
    extremes = [0.91, 0.99, 0.95, None, 0.97]
    # Flag when below: at most floor(0.25 x 5) = 1 stream may lie strictly below.
    assert threshold_for_rate(extremes, "below", 0.25) == 0.95
    assert threshold_for_rate(extremes, "below", 0.0) == 0.91
    assert threshold_for_rate([0.1, 0.3, 0.2], "above", 0.0) == 0.3
    assert threshold_for_rate([0.1, 0.3, 0.2, 0.4], "above", 0.25) == 0.3
    with pytest.raises(ValueError, match="expected in"):
        threshold_for_rate(extremes, "below", 1.0)
    with pytest.raises(ValueError, match="long enough"):
        threshold_for_rate([None, None], "below", 0.1)


def test_calibrate_saves_a_file_that_builds_the_monitor(tmp_path):
    streams = [natural_stream(300, seed) for seed in range(8)]
    calibration = calibrate(
        PradaMonitor(projection_dim=16), streams, 0.125, about={"input_shape": [1, 1, 64]}
    )
    assert calibration.streams == 8 and calibration.stream_queries == 300
    assert calibration.calibration_fpr <= 0.125
    flagged = sum(e < calibration.threshold for e in calibration.extremes)
    assert flagged == 1  # floor(0.125 x 8): the second most suspicious stream sets it
    path = calibration.save(tmp_path / "prada.json")
    assert json.loads(path.read_text())["monitor"] == "prada"
    monitor = build_monitor(f"prada:calibration={path}")
    assert monitor.threshold == calibration.threshold and monitor.projection_dim == 16
    assert monitor.calibrated_on == {"input_shape": [1, 1, 64]}
    assert Calibration.load(path).extremes == pytest.approx(calibration.extremes)
    # A probing stream is flagged at that threshold; the calibration streams at the rate.
    probing = replay(monitor.fresh(), probing_stream(300, 0))
    assert first_crossing(probing, monitor.threshold, "below") is not None


def test_build_monitor_reads_specs_and_names_mistakes(tmp_path):
    m = build_monitor("prada:threshold=0.92,projection_dim=64, test_every=5")
    assert (m.threshold, m.projection_dim, m.test_every) == (0.92, 64, 5)
    assert build_monitor("prada").threshold == 0.9
    ood = build_monitor("ood:threshold=0.4,score=entropy,window=50")
    assert (ood.threshold, ood.score, ood.window) == (0.4, "entropy", 50)
    assert build_monitor("ood").threshold is None
    other = Calibration("ood", {"score": "msp", "window": 9}, 0.2, 0.05, 4, 100, 0.0)
    path = other.save(tmp_path / "ood.json")
    for spec, message in [
        ("stateful", "unknown 'stateful'; expected one of prada, ood"),
        ("prada:window=3", "unknown parameter 'window'"),
        ("prada:threshold", "expected param=value"),
        ("prada:test_every=2.5", "test_every: expected a whole number"),
        ("prada:threshold=high", "threshold: expected a number"),
        ("prada:test_every=0", "test_every: expected a whole number >= 1"),
        ("ood:score=energy", "score: expected one of msp, entropy"),
        ("ood:window=5,window=6", "window given twice"),
        (f"prada:calibration={path}", "calibrates monitor 'ood'"),
        (f"ood:calibration={path},window=3", "drop window"),
        ("prada:threshold=nan", "finite"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_monitor(spec)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        build_monitor(f"ood:calibration={tmp_path / 'bad.json'}")
    with pytest.raises(FileNotFoundError):
        build_monitor(f"ood:calibration={tmp_path / 'missing.json'}")


def test_monitored_and_recording_oracles_watch_an_attack_run(digits_victim):
    from megex import run
    from megex.attacks import DFME

    inner = LocalOracle(digits_victim, budget=1000, explanation=None)
    recorder = RecordingOracle(inner)
    watched = MonitoredOracle(recorder, [PradaMonitor(threshold=0.9), OODMonitor(0.9)])
    attack = DFME(batch_size=16, nz=16, ngf=8, clone_steps=1, seed=0)
    run(attack, watched, 600, progress=False)
    assert watched.queries_used == inner.queries_used == len(recorder.stream()) > 500
    # DFME's probes lie next to the points they probe: PRADA flags the run early.
    first = watched.first_flag()
    assert first is not None and first.monitor == "prada" and first.queries_seen <= 300
    assert watched.measurements["prada"][0].queries_seen >= 100
    assert len(watched.measurements["ood"]) == inner.queries_used - 100 + 1
    # The recorded stream replays to the same measurements.
    again = replay(PradaMonitor(threshold=None), recorder.stream())
    seen = watched.measurements["prada"]
    assert [m.queries_seen for m in again] == [m.queries_seen for m in seen]
    np.testing.assert_allclose([m.statistic for m in again], [m.statistic for m in seen])
    with pytest.raises(ValueError, match="each kind once"):
        MonitoredOracle(inner, [OODMonitor(0.1), OODMonitor(0.2)])


def test_monitor_settings_are_read_from_their_declarations():
    for cls in MONITORS.values():
        signature = inspect.signature(cls).parameters
        # The threshold comes first and may be positional; the settings are keywords.
        assert list(signature)[0] == "threshold" and "threshold" not in cls.PARAMS
        assert all(signature[n].kind is inspect.Parameter.KEYWORD_ONLY for n in cls.PARAMS)
        assert list(cls.PARAMS)[-1] == "rearm"  # the settings every monitor has come last
        assert cls().params() == {n: signature[n].default for n in cls.PARAMS}
    ood = OODMonitor("0.5", window="7", rearm=3.0, score=" entropy ")
    assert ood.describe() == {
        "monitor": "ood", "threshold": 0.5, "score": "entropy", "window": 7, "rearm": 3
    }  # fmt: skip
    assert isinstance(ood.window, int) and isinstance(ood.rearm, int)
    for make, message in [
        (lambda: OODMonitor(window=0), "monitor 'ood': window: expected a whole number >= 1"),
        (lambda: OODMonitor(rearm=True), "monitor 'ood': rearm: expected a whole number >= 0"),
        (lambda: PradaMonitor(outlier_std=0), "outlier_std: expected a number > 0, got 0"),
        (lambda: PradaMonitor(max_distances=100), "max_distances: expected a whole number >= 101"),
    ]:
        with pytest.raises(ValueError, match=message):
            make()


def test_measurements_and_bad_batches():
    monitor = OODMonitor(window=1)
    assert monitor.update("k", torch.rand(2, 1, 2, 2), torch.eye(2)) == [
        Measurement(1, 0.0),
        Measurement(2, 0.0),
    ]
    with pytest.raises(ValueError, match=r"probabilities: expected \(3, K\)"):
        monitor.update("k", torch.rand(3, 1, 2, 2), torch.eye(2))
    with pytest.raises(ValueError, match=r"images: expected \(N, C, H, W\)"):
        monitor.update("k", torch.rand(3, 4), torch.eye(3))
    prada = PradaMonitor()
    prada.update("k", torch.rand(2, 1, 2, 2), torch.eye(2))
    with pytest.raises(ValueError, match="9 values per image, this monitor has seen 4"):
        prada.update("k", torch.rand(2, 1, 3, 3), torch.eye(2))


def test_prada_says_at_once_that_it_needs_scipy(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"needs scipy: pip install 'megex\[data\]'"):
        PradaMonitor()
    assert OODMonitor(0.5).threshold == 0.5  # the other monitor needs only numpy
