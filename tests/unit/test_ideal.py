"""IDEAL: the generator's loss (by hand and its gradient), the class-balance term, the
generator's re-draws, the queries a step spends, the clone's targets, the compute per query
against DFME's, and the settings it refuses."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from victim_support import untrained_8x8_victim

import megex
from megex import LocalOracle
from megex.attacks import ATTACKS, DFME, Ideal, SettingError
from megex.attacks.ideal import balanced_classes, ideal_generator_loss
from megex.attacks.training import disagreement

TINY = {"batch_size": 16, "nz": 16, "ngf": 8, "generator_steps": 2}


@pytest.fixture(scope="module")
def victim() -> megex.Victim:
    return untrained_8x8_victim()


def _by_hand(logits: list[list[float]], targets: list[int], weight: float, of: str) -> float:
    """IDEAL's generator loss written out in plain Python: mean cross-entropy to the
    classes asked for, plus weight * (1/K) sum_k p_k log p_k, of each image's softmax
    averaged over the images ('image') or of the mean softmax ('batch')."""
    n, k = len(logits), len(logits[0])
    probs = []
    for row in logits:
        exps = [math.exp(v) for v in row]
        probs.append([e / sum(exps) for e in exps])
    confidence = -sum(math.log(p[t]) for p, t in zip(probs, targets)) / n
    if of == "batch":
        mean = [sum(p[j] for p in probs) / n for j in range(k)]
        information = sum(m * math.log(m) for m in mean) / k
    else:
        information = sum(q * math.log(q) for p in probs for q in p) / (n * k)
    return confidence + weight * information


def test_generator_loss_is_the_written_out_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64) * 2
    targets = balanced_classes(6, 4)
    assert targets.tolist() == [0, 1, 2, 3, 0, 1]
    for of in ("image", "batch"):
        for weight in (0.0, 5.0):
            loss, confidence, information = ideal_generator_loss(logits, targets, weight, of)
            expected = _by_hand(logits.tolist(), targets.tolist(), weight, of)
            assert loss.item() == pytest.approx(expected, rel=1e-12)
            assert loss.item() == pytest.approx(confidence.item() + weight * information.item())
    # The two forms differ on a batch whose images are unsure (here: every one of them).
    _, _, per_image = ideal_generator_loss(logits, targets, 1.0, "image")
    _, _, of_batch = ideal_generator_loss(logits, targets, 1.0, "batch")
    assert of_batch.item() < per_image.item()
    with pytest.raises(ValueError, match="information_of: expected one of"):
        ideal_generator_loss(logits, targets, 1.0, "images")


def test_generator_loss_gradient_is_the_closed_form():
    # d/dl_i of the mean cross-entropy: (p_i - onehot_i) / B; of (1/K) sum_k m_k log m_k:
    # J_i^T g / B with g = (log m + 1) / K and J_i = diag(p_i) - p_i p_i^T the softmax's
    # Jacobian, i.e. p_i * (g - p_i . g) / B.
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(8, 5, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    targets = balanced_classes(8, 5)
    weight = 2.5
    loss, _, _ = ideal_generator_loss(logits, targets, weight, "batch")
    loss.backward()
    with torch.no_grad():
        b, k = logits.shape
        p = F.softmax(logits, dim=1)
        mean = p.mean(dim=0)
        ce = (p - F.one_hot(targets, k)) / b
        grad_m = (mean.log() + 1) / k
        info = p * (grad_m - (p * grad_m).sum(dim=1, keepdim=True)) / b
    torch.testing.assert_close(logits.grad, ce + weight * info, rtol=1e-10, atol=1e-12)


def test_generator_loss_gradient_per_image_is_the_closed_form():
    # Per image: d/dl_i of (1/(B K)) sum_k p_ik log p_ik is p_i * (g_i - p_i . g_i) / (B K)
    # with g_i = log p_i + 1.
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(7, 4, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    targets = balanced_classes(7, 4)
    loss, _, _ = ideal_generator_loss(logits, targets, 5.0, "image")
    loss.backward()
    with torch.no_grad():
        b, k = logits.shape
        p = F.softmax(logits, dim=1)
        ce = (p - F.one_hot(targets, k)) / b
        grad_p = p.log() + 1
        info = p * (grad_p - (p * grad_p).sum(dim=1, keepdim=True)) / (b * k)
    torch.testing.assert_close(logits.grad, ce + 5.0 * info, rtol=1e-10, atol=1e-12)


def test_class_balance_term_rewards_a_balanced_batch():
    # Two classes, two images, each sure of its class: the mean prediction is (1/2, 1/2)
    # and the term is its lowest, (1/2)(2 x 1/2 log 1/2) = -log(2)/2.
    balanced = torch.tensor([[50.0, -50.0], [-50.0, 50.0]])
    _, _, term = ideal_generator_loss(balanced, torch.tensor([0, 1]), 1.0, "batch")
    assert term.item() == pytest.approx(-math.log(2) / 2, rel=1e-6)
    # Both images of one class: the term is at its highest, 0.
    collapsed = torch.tensor([[50.0, -50.0], [50.0, -50.0]])
    _, _, term = ideal_generator_loss(collapsed, torch.tensor([0, 1]), 1.0, "batch")
    assert term.item() == pytest.approx(0.0, abs=1e-6)
    # Ten classes hit equally: -log(10)/10, below a batch that favours one class.
    even = torch.zeros(10, 10)
    _, _, term_even = ideal_generator_loss(even, balanced_classes(10, 10), 1.0, "batch")
    assert term_even.item() == pytest.approx(-math.log(10) / 10, rel=1e-6)
    skewed = even.clone()
    skewed[:, 3] = 2.0
    _, _, term_skewed = ideal_generator_loss(skewed, balanced_classes(10, 10), 1.0, "batch")
    assert term_skewed.item() > term_even.item()
    # The weight adds it (descending on the loss raises the balance): with a positive
    # weight the balanced batch's loss falls by the weight times the term.
    targets = balanced_classes(10, 10)
    without, _, _ = ideal_generator_loss(skewed, targets, 0.0, "batch")
    with_term, _, _ = ideal_generator_loss(skewed, targets, 5.0, "batch")
    assert with_term.item() == pytest.approx(without.item() + 5.0 * term_skewed.item())
    # Per image (the authors' code) the term is about each image's certainty, not balance:
    # two sure images score 0 whether of one class or two; unsure ones score lowest.
    for sure in (balanced, collapsed):
        _, _, term = ideal_generator_loss(sure, torch.tensor([0, 1]), 1.0, "image")
        assert term.item() == pytest.approx(0.0, abs=1e-6)
    _, _, term = ideal_generator_loss(even, balanced_classes(10, 10), 1.0, "image")
    assert term.item() == pytest.approx(-math.log(10) / 10, rel=1e-6)


def test_a_generator_step_uses_the_clone_alone_and_its_gradient_is_the_loss_s(victim):
    oracle = LocalOracle(victim)
    attack = Ideal(seed=2, **{**TINY, "generator_steps": 1})
    attack.setup(oracle, 10)
    # Both passes then see the same functions (the clone judges in eval mode anyway).
    attack.generator.eval()
    attack.clone.eval()
    attack.generator_opt.step = lambda: None  # keep the weights: compare one gradient
    rng = attack.rng.get_state()
    x, loss = attack.generate_batch()
    from_step = [p.grad.clone() for p in attack.generator.parameters()]
    assert oracle.queries_used == 0, "generating a batch must not query the victim"
    assert all(p.grad is None for p in attack.clone.parameters())

    attack.rng.set_state(rng)
    z = attack.sample_latent(16)
    attack.generator.zero_grad(set_to_none=True)
    images = attack.generator(z)
    torch.testing.assert_close(images, x)  # the batch sent is the one the loss was taken on
    expected, _, _ = ideal_generator_loss(attack.clone(images), balanced_classes(16, 10), 5.0)
    expected.backward()
    assert float(loss) == pytest.approx(expected.item(), rel=1e-6)
    for a, b in zip(from_step, [p.grad for p in attack.generator.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(p.grad.abs().sum() > 0 for p in attack.generator.parameters())


def test_the_batch_sent_is_the_iterate_with_the_lowest_loss(victim):
    attack = Ideal(seed=0, **{**TINY, "generator_steps": 4})
    attack.setup(LocalOracle(victim), 10)
    attack.clone.eval()  # as it judges generated images
    seen: list[tuple[float, torch.Tensor]] = []
    loss_fn = ideal_generator_loss
    generate = attack.generate

    def recording_generate(z):
        pre, x = generate(z)
        with torch.no_grad():
            value, _, _ = loss_fn(attack.clone(x), balanced_classes(16, 10), 5.0)
        seen.append((value.item(), x.detach().clone()))
        return pre, x

    attack.generate = recording_generate
    x, loss = attack.generate_batch()
    assert len(seen) == 4 and attack.generator_updates == 4
    best_value, best_x = min(seen, key=lambda item: item[0])
    assert float(loss) == pytest.approx(best_value, rel=1e-5)
    torch.testing.assert_close(x, best_x)


@pytest.mark.parametrize("target", ["top1", "probabilities"])
def test_a_step_sends_each_batch_once_and_the_clone_learns_its_target(victim, target):
    sent: list[int] = []
    oracle = LocalOracle(victim)
    query = oracle.query
    oracle.query = lambda x, explanation=None: sent.append(len(x)) or query(x, explanation)
    attack = Ideal(seed=0, clone_steps=2, clone_target=target, replay_size=64, **TINY)
    attack.setup(oracle, 10)
    assert attack.queries_per_generator_step() == 0 and attack.iteration_cost() == 32
    attack.step(oracle)
    # Two batches, each made by two generator updates and sent once; one clone update each.
    assert sent == [16, 16] and oracle.queries_used == 32
    assert attack.generator_updates == 4 and attack.clone_updates == 2
    assert len(attack.replay_buffer) == 32

    stored = attack.replay_buffer
    images, probs = stored.images[: len(stored)].float(), stored.probs[: len(stored)]
    logits = attack.clone(images)
    if target == "top1":
        expected = F.cross_entropy(logits, probs.argmax(dim=1))
    else:
        expected = disagreement(logits, probs, attack.config.loss).mean()
    torch.testing.assert_close(attack.clone_loss(images, probs), expected)


def _generator_weights(attack: Ideal) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in attack.generator.state_dict().items()}


def _record_batches(attack: Ideal, oracle: LocalOracle, batches: int) -> list[dict]:
    """The generator's weights and Adam state as each batch's generation starts, and its
    weights as it ends, over `batches` steps of one batch."""
    record: list[dict] = []
    generate_batch = attack.generate_batch

    def recording():
        start = {"start": _generator_weights(attack), "adam": len(attack.generator_opt.state)}
        out = generate_batch()
        record.append({**start, "end": _generator_weights(attack)})
        return out

    attack.generate_batch = recording
    for _ in range(batches):
        attack.step(oracle)
    return record


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "every, drawn",
    [
        (1, [False, True, True, True, True]),  # before every batch: the paper's
        (16, [False, True, True, True, True]),  # batch_size: the same
        (48, [False, False, False, True, False]),  # once 48 queries are spent (4th batch)
        (0, [False, False, False, False, False]),  # never
    ],
)
def test_the_generator_is_redrawn_when_the_setting_says(victim, every, drawn):
    oracle = LocalOracle(victim)
    attack = Ideal(seed=0, generator_restart_every=every, **TINY)
    attack.setup(oracle, 10)
    first = _generator_weights(attack)
    record = _record_batches(attack, oracle, 5)
    assert _same(record[0]["start"], first)
    for i in range(1, 5):
        # A re-drawn generator starts afresh (other weights, no Adam state); otherwise it
        # goes on from where the last batch left it.
        continued = _same(record[i]["start"], record[i - 1]["end"])
        assert continued != drawn[i] and (record[i]["adam"] == 0) == drawn[i], (every, i)
        assert not _same(record[i]["end"], record[i]["start"]), "it learnt in the batch"
    # A run started again re-draws the same generators (each re-draw has its own seed).
    again = Ideal(seed=0, generator_restart_every=every, **TINY)
    again_oracle = LocalOracle(victim)
    again.setup(again_oracle, 10)
    for a, b in zip(record, _record_batches(again, again_oracle, 5)):
        assert _same(a["start"], b["start"])


def test_clone_updates_per_query_are_dfmes_at_the_same_allotment(victim):
    rate, budget = 25.0, 3_072
    large = {"batch_size": 128, "nz": 16, "ngf": 8}
    rows = {}
    for name, attack in (("dfme", DFME(**large)), ("ideal", Ideal(**large, generator_steps=1))):
        counts: Counter = Counter()
        original_setup = attack.setup

        def setup(oracle, iterations, _attack=attack, _setup=original_setup, _counts=counts):
            _setup(oracle, iterations)
            _attack.clone_opt.register_step_post_hook(lambda *_: _counts.update(["steps"]))

        attack.setup = setup
        oracle = LocalOracle(victim, budget=budget)
        result = megex.run(attack, oracle, budget, eval_every=budget, progress=False,
                           evaluator=lambda clone: {"clone_accuracy": 0.0})  # fmt: skip
        assert counts["steps"] == result.clone_updates
        rows[name] = (result.queries_used, counts["steps"], int(rate * result.queries_used / 1000))
    for name, (_, steps, allotted) in rows.items():
        assert allotted <= steps <= allotted + 1, name
    (q_dfme, steps_dfme, _), (q_ideal, steps_ideal, _) = rows["dfme"], rows["ideal"]
    assert abs(steps_ideal - steps_dfme * q_ideal / q_dfme) <= 1


def test_settings_ideal_cannot_use_are_refused_with_the_setting_named():
    with pytest.raises(SettingError, match="victim_confidence: ideal's generator"):
        Ideal(victim_confidence=1.0)
    with pytest.raises(SettingError, match="disagreement_until: ideal's generator"):
        Ideal(disagreement_until=20_000)
    for steps in (0, 31, 2.5):
        with pytest.raises(SettingError, match="generator_steps: expected a whole number"):
            Ideal(generator_steps=steps)
    with pytest.raises(SettingError, match="clone_target: expected one of"):
        Ideal(clone_target="labels")
    with pytest.raises(SettingError, match="class_balance"):
        Ideal(class_balance=-1.0)
    with pytest.raises(SettingError, match="generator_restart_every"):
        Ideal(generator_restart_every=-1)
    # The defaults are the paper's choices where they map onto the loop.
    c = ATTACKS["ideal"].config_class()
    assert (c.generator_restart_every, c.clone_target, c.class_balance) == (1, "top1", 5.0)
    assert c.information_of == "image"
    with pytest.raises(SettingError, match="information_of: expected one of"):
        Ideal(information_of="mean")
    assert (c.generator_lr, c.generator_steps, c.victim_confidence) == (1e-3, 30, 0.0)
