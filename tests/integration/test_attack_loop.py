"""The shared attack loop through the Oracle protocol: budgets, user oracles, resume."""

import os
import signal
import sys

import pytest
import torch
from torch import nn
from victim_support import scaled_digits_victim

import megex
from megex import Answer, BudgetExceeded, Explanation, LocalOracle
from megex.attacks import DFME, MEGEX, Ideal
from megex.evaluate import Evaluator

SMALL = {"batch_size": 32, "clone_steps": 2}


class UsersOwnOracle:
    """An Oracle written by a user from scratch: its own ledger, its own victim call."""

    def __init__(self, model: nn.Module, budget: int):
        self.model, self.budget, self.used = model.eval(), budget, 0
        self.seen_explanations = []

    input_shape = (1, 8, 8)
    num_classes = 10

    @property
    def queries_used(self):
        return self.used

    @property
    def remaining(self):
        return self.budget - self.used

    def query(self, x, explanation=None):
        if self.used + len(x) > self.budget:
            raise BudgetExceeded(len(x), self.remaining, self.budget)
        self.used += len(x)
        with torch.no_grad():
            probs = torch.softmax(self.model(x), 1)
        maps, spec = None, None
        if explanation:
            spec = Explanation(target="all") if explanation is True else explanation
            self.seen_explanations.append(spec)
            maps = megex.explain(self.model, x, spec)
        return Answer(probs, probs.argmax(1), explanation=maps, explanation_spec=spec)


@pytest.fixture
def hand_written_victim():
    torch.manual_seed(1)
    module = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return megex.Victim.from_module(module, (1, 8, 8), 10, mean=0.5, std=0.5)


@pytest.mark.parametrize("attack_class", [MEGEX, DFME])
def test_both_attacks_run_against_a_users_own_oracle(hand_written_victim, attack_class):
    oracle = UsersOwnOracle(hand_written_victim, budget=3000)
    assert isinstance(oracle, megex.Oracle)
    result = megex.run(attack_class(seed=0, **SMALL), oracle, progress=False)
    assert result.queries_used == oracle.queries_used <= 3000
    assert result.queries_used > 3000 - attack_class(**SMALL).iteration_cost() - 1
    if attack_class is MEGEX:
        assert oracle.seen_explanations and result.details["generator_gradient"].startswith("exact")
    else:
        assert not oracle.seen_explanations


def test_wrapped_module_is_queried_explained_and_attacked(hand_written_victim, digits_test):
    x, y = digits_test
    oracle = LocalOracle(hand_written_victim, budget=2500, explanation=Explanation(target="all"))
    evaluator = Evaluator.from_victim(hand_written_victim, x, y)
    result = megex.run(MEGEX(**SMALL), oracle, evaluator=evaluator, progress=False)
    assert result.queries_used == oracle.queries_used
    assert result.metrics and 0 <= result.fidelity <= 1
    assert result.details["explanation"]["target"] == "all"


def test_attack_stops_at_the_oracles_budget(digits_victim):
    oracle = LocalOracle(digits_victim, budget=10_000)
    oracle.query(torch.rand(1000, 1, 8, 8))  # someone else spent part of it
    result = megex.run(MEGEX(**SMALL), oracle, budget=50_000, progress=False)
    assert oracle.queries_used <= 10_000 and result.queries_used == oracle.queries_used - 1000


def test_attack_reports_which_explanation_it_used(digits_victim):
    for spec, kind in [
        (Explanation("gradient", target="all"), "exact (all classes)"),
        (Explanation("gradient"), "single class"),
        (Explanation("smoothgrad", target="all"), "all classes, approximate maps"),
        (Explanation("integrated_gradients", target="predicted", steps=4), "single class"),
        (
            Explanation("input_x_gradient", output="logit"),
            "single class, approximated from one logit",
        ),
    ]:
        oracle = LocalOracle(digits_victim, budget=500)
        result = megex.run(MEGEX(explanation=spec, **SMALL), oracle, progress=False)
        assert result.details["generator_gradient"] == kind
        assert result.details["explanation"]["method"] == spec.method


def test_log_probability_gradients_from_every_output_match_autograd(digits_victim):
    """d log p / dx recovered from each output kind equals autograd through the victim."""
    from megex.attacks.megex import log_probability_gradients

    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8)
    for output in ("probability", "log_probability", "logit"):
        oracle = LocalOracle(digits_victim, explanation=Explanation(target="all", output=output))
        answer = oracle.query(x, explanation=True)
        dlogp = log_probability_gradients(answer, x)
        reference = megex.explain(
            digits_victim, x, Explanation(target="all", output="log_probability")
        )
        torch.testing.assert_close(dlogp, reference, rtol=1e-3, atol=1e-5)


def test_class_combination_is_the_weighted_sum_over_classes():
    from megex.attacks.megex import class_combination

    torch.manual_seed(0)
    maps = torch.randn(6, 10, 3, 5, 7)
    weights = torch.randn(6, 10)
    expected = (weights.view(6, 10, 1, 1, 1) * maps).sum(dim=1)
    torch.testing.assert_close(class_combination(weights, maps), expected)
    # Channels-last maps (as a CPU service returns them) give the same.
    cl = maps.flatten(0, 1).contiguous(memory_format=torch.channels_last).view_as(maps)
    torch.testing.assert_close(class_combination(weights, cl), expected)


def test_too_small_budget_is_a_clear_error(digits_victim):
    with pytest.raises(ValueError, match="less than one iteration"):
        megex.run(DFME(**SMALL), LocalOracle(digits_victim, budget=10), progress=False)
    with pytest.raises(ValueError, match="pass budget"):
        megex.run(MEGEX(**SMALL), LocalOracle(digits_victim), progress=False)
    with pytest.raises(TypeError, match="unknown setting 'lerning_rate'"):
        MEGEX(lerning_rate=1)
    with pytest.raises(ValueError, match="batch_size"):
        MEGEX(batch_size=0)


def _run_in_folder(attack, victim, budget, evaluator, every, run_dir, **kwargs):
    """megex.run on a fresh LocalOracle whose ledger goes into the run's checkpoints."""
    oracle = LocalOracle(victim, budget=budget)
    result = megex.run(
        attack, oracle, evaluator=evaluator, eval_every=every, run_dir=run_dir,
        progress=False, service_state=oracle.state_dict, **kwargs,
    )  # fmt: skip
    return result, oracle


# IDEAL with 1 generator update per batch (its 30 would make this test minutes long); its
# generator is re-drawn before every batch, from a seed of its own.
@pytest.mark.parametrize(
    "attack_class, extra", [(MEGEX, {}), (DFME, {}), (Ideal, {"generator_steps": 1})]
)
def test_interrupted_and_resumed_run_equals_uninterrupted(
    tmp_path, digits_victim, digits_test, attack_class, extra
):
    x, y = digits_test
    evaluator = Evaluator.from_victim(digits_victim, x, y)
    budget, every = 6000, 1000
    settings = dict(seed=3, **SMALL, **extra)

    straight, _ = _run_in_folder(
        attack_class(**settings), digits_victim, budget, evaluator, every, tmp_path / "a"
    )

    def interrupt(iteration, spent):
        if spent >= 3500:
            raise KeyboardInterrupt

    first = LocalOracle(digits_victim, budget=budget)
    partial = megex.run(
        attack_class(**settings),
        first, evaluator=evaluator, eval_every=every, run_dir=tmp_path / "b", progress=False,
        callback=interrupt, service_state=first.state_dict,
    )  # fmt: skip
    assert not partial.finished and not (tmp_path / "b" / "result.json").exists()

    # The service side comes back with its ledger as of the last checkpoint.
    from megex.runs import RunFolder

    saved = RunFolder(tmp_path / "b").load_checkpoint()["service"]
    second = LocalOracle(digits_victim, budget=budget)
    second.load_state_dict(saved)
    resumed = megex.run(
        attack_class(**settings),
        second, evaluator=evaluator, eval_every=every, run_dir=tmp_path / "b", resume=True,
        progress=False, service_state=second.state_dict,
    )  # fmt: skip
    assert resumed.finished
    assert resumed.queries_used == straight.queries_used == second.queries_used
    assert resumed.clone_accuracy == straight.clone_accuracy
    assert [m["clone_accuracy"] for m in resumed.metrics] == [
        m["clone_accuracy"] for m in straight.metrics
    ]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["attack"]["clone"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["attack"]["clone"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in (
        "config.json",
        "metrics.jsonl",
        "checkpoint.pt",
        "result.json",
        "clone.safetensors",
    ):
        assert (tmp_path / "b" / name).is_file()


def test_early_stop_on_an_exhausted_oracle_is_evaluated_and_recorded(
    tmp_path, digits_victim, digits_test
):
    x, y = digits_test
    oracle = LocalOracle(digits_victim, budget=300)
    attack = MEGEX(**SMALL)
    result = megex.run(
        attack,
        oracle, budget=1000, evaluator=Evaluator.from_victim(digits_victim, x, y),
        run_dir=tmp_path / "r", progress=False,
    )  # fmt: skip
    per_iteration = attack.iteration_cost()
    assert result.queries_used == oracle.queries_used == (300 // per_iteration) * per_iteration
    assert result.iterations == 300 // per_iteration
    assert result.metrics[-1]["queries"] == result.queries_used
    assert "less than one iteration" in result.details["stopped_early"]
    saved = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert saved["iteration"] == result.iterations


def _interrupted_run(run_dir, oracle) -> None:
    """A MEGEX run in `run_dir` stopped by Ctrl-C after 3 iterations (its checkpoint kept)."""

    def stop(iteration, spent):
        if iteration == 3:
            raise KeyboardInterrupt

    megex.run(
        MEGEX(**SMALL),
        oracle, eval_every=100, run_dir=run_dir, progress=False, callback=stop,
        evaluator=lambda clone: {"clone_accuracy": 0.0},
    )  # fmt: skip


def test_resume_with_other_settings_is_refused(tmp_path, digits_victim):
    _interrupted_run(tmp_path / "r", LocalOracle(digits_victim, budget=5000))
    assert (tmp_path / "r" / "checkpoint.pt").is_file()
    with pytest.raises(ValueError, match="batch_size: 32 then, 64 now"):
        megex.run(
            MEGEX(batch_size=64, clone_steps=2),
            LocalOracle(digits_victim, budget=5000), run_dir=tmp_path / "r", resume=True,
            progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="method: 'megex' then, 'dfme' now"):
        megex.run(
            DFME(**SMALL),
            LocalOracle(digits_victim, budget=5000), run_dir=tmp_path / "r", resume=True,
            progress=False,
        )  # fmt: skip


def test_a_run_behind_a_defense_is_not_resumed_without_it(tmp_path, digits_victim):
    from megex.defenses import build_defense

    defended = LocalOracle(digits_victim, budget=5000, defenses=[build_defense("sign")])
    _interrupted_run(tmp_path / "r", defended)
    with pytest.raises(ValueError, match="defenses: .*sign.* then, none now"):
        megex.run(
            MEGEX(**SMALL),
            LocalOracle(digits_victim, budget=5000), run_dir=tmp_path / "r", resume=True,
            progress=False,
        )  # fmt: skip


def test_classes_hidden_by_rounding_do_not_blow_up_the_generator_gradient(digits_victim):
    from megex.attacks.megex import log_probability_gradients
    from megex.defenses import build_defense

    x = torch.rand(8, 1, 8, 8)
    spec = Explanation(target="all")
    rounded = LocalOracle(digits_victim, explanation=spec, defenses=[build_defense("round:2")])
    answer = rounded.query(x, explanation=True)
    assert (answer.probabilities == 0).any()
    dlogp = log_probability_gradients(answer, x)
    hidden = answer.probabilities == 0
    assert torch.isfinite(dlogp).all() and (dlogp[hidden] == 0).all()
    exact = megex.explain(digits_victim, x, Explanation(target="all", output="log_probability"))
    # Visible classes keep (approximately, since p itself was rounded) their true gradient.
    assert dlogp[~hidden].abs().max() < 10 * exact.abs().max()


def test_probability_maps_of_classes_below_1e_8_are_left_out(digits_victim):
    """A class shown with 0 < p < 1e-8 is unknown (zeros), not its map over p clamped at
    1e-8; every other class keeps its exact d log p. (Sharpened so that some classes fall
    below 1e-8 on random images.)"""
    from megex.attacks.megex import log_probability_gradients

    torch.manual_seed(0)
    victim = scaled_digits_victim(digits_victim, 20.0)
    x = torch.rand(8, 1, 8, 8)
    answer = LocalOracle(victim, explanation=Explanation(target="all")).query(x, explanation=True)
    unlikely = answer.probabilities < 1e-8
    assert ((answer.probabilities > 0) & unlikely).any() and (~unlikely).any()
    dlogp = log_probability_gradients(answer, x)
    assert (dlogp[unlikely] == 0).all()
    exact = megex.explain(victim, x, Explanation(target="all", output="log_probability"))
    torch.testing.assert_close(dlogp[~unlikely], exact[~unlikely], rtol=1e-3, atol=1e-4)


def _averaged_path_gradients(victim, x: torch.Tensor, steps: int) -> torch.Tensor:
    """(N, K, C, H, W): the mean of dp_k/dx at the midpoints of the path 0 -> x, by autograd."""
    total = torch.zeros(x.shape[0], 10, *x.shape[1:])
    for i in range(steps):
        point = (((i + 0.5) / steps) * x).requires_grad_(True)
        p = torch.softmax(victim(point), dim=1)
        for k in range(10):
            (g,) = torch.autograd.grad(p[:, k].sum(), point, retain_graph=True)
            total[:, k] += g
    return total / steps


def test_integrated_gradients_are_undone_only_for_classes_likely_enough(digits_victim):
    """An integrated-gradients map divided by x and by p_k gives d log p_k only for classes
    the image makes likely; below the floor its map is left out (zeros), and the clone's
    map-matching weight for that class is 0, so it is not taught a zero gradient."""
    from megex.attacks.megex import INTEGRATED_GRADIENTS_MIN_PROBABILITY as floor
    from megex.attacks.megex import log_probability_gradients

    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8) * 0.9 + 0.1  # no pixel at the baseline
    spec = Explanation(method="integrated_gradients", target="all", steps=8)
    answer = LocalOracle(digits_victim, explanation=spec).query(x, explanation=spec)
    dlogp = log_probability_gradients(answer, x)
    p = answer.probabilities
    unlikely = p < floor
    assert unlikely.any() and (~unlikely).any()
    assert (dlogp[unlikely] == 0).all()
    expected = _averaged_path_gradients(digits_victim, x, 8) / p.view(16, 10, 1, 1, 1)
    torch.testing.assert_close(dlogp[~unlikely], expected[~unlikely], rtol=1e-3, atol=1e-5)

    attack = MEGEX(explanation=spec, **SMALL)
    attack.setup(LocalOracle(digits_victim, budget=1000), iterations=10)
    _, weights = attack.projected_maps(answer, x)
    assert (weights[unlikely] == 0).all() and (weights[~unlikely] != 0).all()


def test_non_finite_map_values_are_unknown_not_propagated(digits_victim):
    from megex.attacks.megex import log_probability_gradients

    x = torch.rand(4, 1, 8, 8)
    spec = Explanation(target="all", output="log_probability")
    answer = LocalOracle(digits_victim, explanation=spec).query(x, explanation=spec)
    answer.explanation[0, 3, 0, 2, 2] = float("nan")
    answer.explanation[1, 1, 0, 4, 5] = float("inf")
    dlogp = log_probability_gradients(answer, x)
    assert torch.isfinite(dlogp).all()
    # A pixel unknown in one class's map is unknown in every class's.
    assert (dlogp[0, :, 0, 2, 2] == 0).all() and (dlogp[1, :, 0, 4, 5] == 0).all()
    torch.testing.assert_close(dlogp[2:], answer.explanation[2:])
    # Through the conversion from probability maps too (which mixes nothing, but divides).
    spec = Explanation(target="all", output="probability")
    answer = LocalOracle(digits_victim, explanation=spec).query(x, explanation=spec)
    answer.explanation[0, 3, 0, 2, 2] = float("inf")
    dlogp = log_probability_gradients(answer, x)
    assert torch.isfinite(dlogp).all() and (dlogp[0, :, 0, 2, 2] == 0).all()
    assert (dlogp[0, :, 0, 2, 3] != 0).any()


@pytest.mark.parametrize("target", ["all", "predicted"])
@pytest.mark.parametrize("output", ["probability", "log_probability", "logit"])
def test_clone_path_gradient_is_the_victims_map_when_the_clone_is_the_victim(
    digits_victim, target, output
):
    """Integrated-gradients maps are matched by the clone's own path average: with the
    victim itself as the clone, the clone's counterpart equals the projected map the
    service's answer gives (autograd through the same path on both sides)."""
    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8) * 0.9 + 0.1
    spec = Explanation(
        method="integrated_gradients", target=target, output=output, steps=4, baseline=0.0
    )
    answer = LocalOracle(digits_victim, explanation=spec).query(x, explanation=spec)
    attack = MEGEX(explanation=spec, **SMALL)
    attack.setup(LocalOracle(digits_victim, budget=1000), iterations=10)
    target_map, weights = attack.projected_maps(answer, x)
    attack.clone = digits_victim.eval()
    counterpart = attack.clone_path_gradient(x, answer.probabilities, weights, spec)
    known = (target_map != 0).to(counterpart.dtype)
    assert known.mean() > 0.5
    torch.testing.assert_close(counterpart * known, target_map, rtol=1e-3, atol=1e-5)
    # The clone's gradient at x is not that map: it is what an IG map must not be matched to.
    x_grad = x.clone().requires_grad_(True)
    logp = torch.log_softmax(digits_victim(x_grad), dim=1)
    (at_x,) = torch.autograd.grad((weights * logp).sum(), x_grad)
    assert not torch.allclose(at_x * known, target_map, rtol=1e-2, atol=1e-3)


def test_integrated_gradients_maps_fresh_and_replayed_are_matched_by_the_path_average(
    digits_victim, monkeypatch
):
    """The clone's loss on integrated-gradients maps, from an answer or from the replay
    buffer, goes through clone_path_gradient (and its value is finite)."""
    spec = Explanation(method="integrated_gradients", target="all", steps=4)
    attack = MEGEX(explanation=spec, replay_maps=True, **SMALL)
    attack.setup(LocalOracle(digits_victim, budget=1000), iterations=10)
    x = torch.rand(8, 1, 8, 8) * 0.9 + 0.1
    answer = LocalOracle(digits_victim, explanation=spec).query(x, explanation=spec)
    calls = []
    original = attack.clone_path_gradient

    def counted(*args, **kwargs):
        calls.append(args[-1])
        return original(*args, **kwargs)

    monkeypatch.setattr(attack, "clone_path_gradient", counted)
    fresh = attack.clone_loss(x, answer.probabilities, answer=answer)
    target, weights = attack.projected_maps(answer, x)
    stored = {"maps": target.half().float(), "projections": weights}
    replayed = attack.clone_loss(x, answer.probabilities, stored=stored)
    assert len(calls) == 2 and all(c.method == "integrated_gradients" for c in calls)
    assert torch.isfinite(fresh) and torch.isfinite(replayed)
    fresh.backward()
    assert all(torch.isfinite(p.grad).all() for p in attack.clone.parameters())


def test_clone_path_gradient_leaves_batch_norm_statistics_and_mode_alone(digits_victim):
    spec = Explanation(method="integrated_gradients", target="all", steps=4)
    attack = MEGEX(explanation=spec, **SMALL)
    attack.setup(LocalOracle(digits_victim, budget=1000), iterations=10)
    attack.clone = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)
    ).train()
    norm = attack.clone[1]
    before = norm.running_mean.clone()
    x = torch.rand(5, 1, 8, 8)
    weights = torch.randn(5, 10)
    grad = attack.clone_path_gradient(x, torch.full((5, 10), 0.1), weights, spec)
    assert grad.shape == x.shape and grad.requires_grad
    assert torch.equal(norm.running_mean, before) and norm.training
    # Eval mode: each image's counterpart does not depend on the others in the batch.
    alone = attack.clone_path_gradient(x[:1], torch.full((1, 10), 0.1), weights[:1], spec)
    torch.testing.assert_close(alone, grad[:1])


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX")
def test_sigterm_stops_between_steps_and_resumes_exactly(tmp_path, digits_victim, digits_test):
    """SIGTERM to a run with a folder: it ends its current step, saves a checkpoint there
    (not back at its last evaluation) and returns unfinished; resumed, it ends exactly where
    an uninterrupted run does. Without a folder the signal keeps its usual handler."""
    x, y = digits_test
    evaluator = Evaluator.from_victim(digits_victim, x, y)
    budget, every = 5000, 2500
    settings = dict(seed=4, **SMALL)
    handler = signal.getsignal(signal.SIGTERM)
    seen = []
    megex.run(
        MEGEX(**settings), LocalOracle(digits_victim, budget=500), progress=False,
        callback=lambda *_: seen.append(signal.getsignal(signal.SIGTERM)),
    )  # fmt: skip
    assert seen and all(h is handler for h in seen)
    straight, _ = _run_in_folder(
        MEGEX(**settings), digits_victim, budget, evaluator, every, tmp_path / "a"
    )

    def terminate(iteration, spent):
        if iteration == 20:  # 20 x 96 = 1,920 queries, before the first evaluation
            os.kill(os.getpid(), signal.SIGTERM)

    partial, first = _run_in_folder(
        MEGEX(**settings), digits_victim, budget, evaluator, every, tmp_path / "b",
        callback=terminate,
    )  # fmt: skip
    assert signal.getsignal(signal.SIGTERM) is handler
    assert not partial.finished and partial.iterations == 20 and partial.metrics == []
    from megex.runs import RunFolder

    saved = RunFolder(tmp_path / "b").load_checkpoint()
    assert saved["iteration"] == 20 and saved["queries_spent"] == first.queries_used
    second = LocalOracle(digits_victim, budget=budget)
    second.load_state_dict(saved["service"])
    resumed = megex.run(
        MEGEX(**settings), second, evaluator=evaluator, eval_every=every,
        run_dir=tmp_path / "b", resume=True, progress=False, service_state=second.state_dict,
    )  # fmt: skip
    assert resumed.finished and resumed.queries_used == straight.queries_used
    assert [m["clone_accuracy"] for m in resumed.metrics] == [
        m["clone_accuracy"] for m in straight.metrics
    ]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["attack"]["clone"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["attack"]["clone"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX")
def test_sigterm_in_the_last_step_is_passed_on_once_the_run_is_saved(tmp_path, digits_victim):
    """A stop request that comes while the run takes its last step cannot stop it between
    steps: the run finishes and saves its result, then the signal goes on to the handler
    outside the run (a driver of many runs must stop, not start the next one)."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        attack = MEGEX(seed=4, **SMALL)
        steps = 500 // 96  # the iterations a budget of 500 holds, 96 queries each

        def terminate(iteration, spent):
            if iteration == steps:  # after the last step, before the run returns
                os.kill(os.getpid(), signal.SIGTERM)
                assert received == []  # the run's own handler took it

        result, _ = _run_in_folder(
            attack, digits_victim, 500, None, 500, tmp_path / "r", callback=terminate
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.finished and result.iterations == steps
    assert (tmp_path / "r" / "result.json").is_file()
    assert received == [signal.SIGTERM]
