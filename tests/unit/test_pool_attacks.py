"""The attacks with the attacker's own images (knockoff, jbda and their -maps variants):
their losses and gradients against autograd, the maps they keep against the victim's true
d log p / dx, how they choose and augment queries, the answer store, their refusals, and
an interrupted run resumed exactly."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from victim_support import scaled_digits_victim

import megex
from megex import Explanation, LocalOracle, data
from megex.attacks import ATTACKS, JBDA, JBDAMaps, Knockoff, KnockoffMaps
from megex.attacks.answers import AnswerStore
from megex.attacks.knockoff import _k_center
from megex.attacks.pool import pool_tensor
from megex.attacks.training import disagreement
from megex.evaluate import Evaluator
from megex.pools import Pool
from megex.runs import RunFolder

ALL = Explanation("gradient", target="all")
PREDICTED = Explanation("gradient", target="predicted")
# Maps are kept in float16: about three significant digits.
HALF = dict(rtol=2e-3, atol=1e-4)


@pytest.fixture(scope="module")
def pool() -> torch.Tensor:
    """60 digits training images: the attacker's images (their labels are never read)."""
    return data.load("digits").train_tensors()[0][:60]


@pytest.fixture(scope="module")
def soft_victim(digits_victim) -> megex.Victim:
    """The digits victim at temperature 5: no class's probability comes near 1e-8.

    The trained victim gives some classes p < 1e-8, where the stored maps are not d log p
    (see test_maps_of_classes_below_1e_8_are_the_victims_d_log_p)."""
    return scaled_digits_victim(digits_victim, 0.2)


def _stepped(attack_class, victim, pool, explanation=ALL, steps=1, **settings):
    """An attack set up against a LocalOracle that explains with `explanation`, after
    `steps` requests (no clone update yet). A maps variant asks for `explanation`; for maps
    of every class it leaves the choice to the service (whose default they are here)."""
    oracle = LocalOracle(victim, budget=10_000, explanation=explanation)
    settings = {"seed": 0, "query_batch": 20, **settings}
    if issubclass(attack_class, (KnockoffMaps, JBDAMaps)) and explanation is not ALL:
        settings.setdefault("explanation", explanation)
    attack = attack_class(pool, **settings)
    attack.setup(oracle, 10)
    for _ in range(steps):
        attack.step(oracle)
    return attack, oracle


def _log_p_gradients(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """d log softmax(model(x))_k / dx for every class k by autograd: (N, K, C, H, W)."""
    x = x.detach().clone().requires_grad_(True)
    logp = F.log_softmax(model(x), dim=1)
    grads = [
        torch.autograd.grad(logp[:, k].sum(), x, retain_graph=True)[0] for k in range(logp.shape[1])
    ]
    return torch.stack(grads, dim=1)


def _per_image_gradient(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d log p_label / dx, one image at a time (no batch at all in the computation)."""
    out = []
    for image, label in zip(x, labels):
        image = image.detach().clone().unsqueeze(0).requires_grad_(True)
        logp = F.log_softmax(model(image), dim=1)[0, int(label)]
        out.append(torch.autograd.grad(logp, image)[0][0])
    return torch.stack(out)


def _expected_maps_loss(clone, batch, v, target, weight):
    """KL(victim || clone) on the batch + weight * mean over images with a map of
    ||g - t||^2 / (||g||^2 + ||t||^2), g = d(sum_k v_k log pS_k)/dx by autograd, with the
    pixels a map leaves unknown (0) out of g, as the maps are documented to be matched."""
    x = batch["images"].detach().clone().requires_grad_(True)
    logits = clone(x)
    p = batch["probs"].clamp_min(1e-8)
    p = p / p.sum(dim=1, keepdim=True)
    kl = (p * (p.log() - F.log_softmax(logits, dim=1))).sum(dim=1).mean()
    (g,) = torch.autograd.grad((v * F.log_softmax(logits, dim=1)).sum(), x, create_graph=True)
    g = g * (target != 0)
    error = (g - target).pow(2).flatten(1).sum(1) / (g.pow(2) + target.pow(2)).flatten(1).sum(1)
    has_map = (v != 0).any(dim=1)
    return kl + weight * error[has_map].mean(), kl


# --- the maps variant's clone loss against autograd ---------------------------------------


def _all_class_loss_by_hand(attack, batch, weight):
    """(attack.clone_loss(batch), the same by hand, its KL part, the projection v)."""
    state = attack.rng.get_state()
    loss = attack.clone_loss(batch)
    # The projection v ~ N(0, I) over classes, drawn from the attack's generator as the
    # loss draws it; a class whose map is all zeros (unknown) gets weight 0.
    redraw = torch.Generator().set_state(state)
    maps = batch["maps"]
    n, k = maps.shape[:2]
    known = maps.flatten(2).ne(0).any(dim=-1)
    v = torch.randn(n, k, generator=redraw) * known
    target = (v.view(n, k, 1, 1, 1) * maps).sum(dim=1)
    expected, kl = _expected_maps_loss(attack.clone, batch, v, target, weight)
    return loss, expected, kl, v


def test_all_class_maps_loss_is_kl_plus_projected_relative_map_error(digits_victim, pool):
    attack, _ = _stepped(KnockoffMaps, digits_victim, pool, explanation_loss=0.7)
    batch = attack.store.sample(16, attack.rng)
    loss, expected, kl, _ = _all_class_loss_by_hand(attack, batch, 0.7)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert float((loss - kl).detach()) > 0.01  # the map term is there, and weighs in
    # The map term trains the clone (double backward): the same parameter gradients.
    params = list(attack.clone.parameters())
    got = torch.autograd.grad(loss, params)
    want = torch.autograd.grad(expected, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("clone", ["new", "victim"])
def test_unknown_maps_pixels_and_classes_are_left_out_of_the_map_term(soft_victim, pool, clone):
    attack, _ = _stepped(KnockoffMaps, soft_victim, pool, explanation_loss=0.7)
    if clone == "victim":
        # The victim's own gradients: what a clone is taught for unknowns shows at once
        # (a new clone's gradients are small beside the maps: the image left out shows).
        attack.clone = copy.deepcopy(soft_victim).eval()
    batch = attack.store.sample(16, attack.rng)
    batch["maps"][0, :, :, 0, :] = 0  # a row of pixels no map tells
    batch["maps"][1, 3] = 0  # one class's map unknown
    batch["maps"][2] = 0  # an image without any map
    loss, expected, _, v = _all_class_loss_by_hand(attack, batch, 0.7)
    assert float(v[1, 3]) == 0 and bool(v[1].count_nonzero() == 9) and not bool(v[2].any())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    if clone == "victim":
        assert float(loss.detach()) < 1e-4  # nothing is taught where the maps say nothing


def test_predicted_class_maps_loss_matches_the_stored_class(digits_victim, pool):
    attack, _ = _stepped(KnockoffMaps, digits_victim, pool, explanation=PREDICTED)
    assert attack.store.map_shape == (1, 8, 8)
    batch = attack.store.sample(16, attack.rng)
    loss = attack.clone_loss(batch)

    v = F.one_hot(batch["classes"], 10).float()
    assert torch.equal(batch["classes"], batch["probs"].argmax(dim=1))
    expected, _ = _expected_maps_loss(attack.clone, batch, v, batch["maps"], 1.0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("explanation", [ALL, PREDICTED], ids=["all", "predicted"])
def test_the_victim_as_its_own_clone_matches_its_maps(soft_victim, pool, explanation):
    attack, _ = _stepped(KnockoffMaps, soft_victim, pool, explanation=explanation)
    attack.clone = copy.deepcopy(soft_victim).eval()
    batch = attack.store.sample(32, attack.rng)
    plain = disagreement(attack.clone(batch["images"]), batch["probs"], "kl")
    assert float(plain.mean().detach()) < 1e-5
    # Only float16 rounding of the maps is left: relative error ~ (1e-3)^2 per image.
    assert attack.clone_loss(batch).item() < 1e-4

    no_maps = KnockoffMaps(pool, seed=0, explanation_loss=0.0, explanation=explanation)
    no_maps.setup(LocalOracle(soft_victim, explanation=explanation), 1)
    no_maps.clone = attack.clone
    torch.testing.assert_close(no_maps.clone_loss(batch), plain.mean())


def test_a_clone_unlike_the_victim_pays_for_its_maps(soft_victim, pool):
    """The counterpart of the test above: the map term is not ~0 whatever the clone."""
    attack, _ = _stepped(KnockoffMaps, soft_victim, pool)
    batch = attack.store.sample(32, attack.rng)
    with_maps = attack.clone_loss(batch).item()
    no_maps = KnockoffMaps(pool, seed=0, explanation_loss=0.0)
    no_maps.setup(LocalOracle(soft_victim, explanation=ALL), 1)
    no_maps.clone = attack.clone
    assert with_maps > no_maps.clone_loss(batch).item() + 0.1


def test_the_trained_victim_as_its_own_clone_matches_its_maps(digits_victim, pool):
    attack, _ = _stepped(KnockoffMaps, digits_victim, pool)
    attack.clone = copy.deepcopy(digits_victim).eval()
    batch = attack.store.sample(32, attack.rng)
    assert attack.clone_loss(batch).item() < 1e-4


# --- the stored maps are the victim's d log p / dx -------------------------------------------


def test_stored_maps_are_the_victims_d_log_p(digits_victim, soft_victim, pool):
    attack, _ = _stepped(KnockoffMaps, soft_victim, pool, steps=2)
    images = attack.store.get("images")
    assert len(images) == 40 and float(attack.store.get("probs").min()) > 1e-6
    torch.testing.assert_close(
        attack.store.get("maps").float(), _log_p_gradients(soft_victim, images), **HALF
    )
    torch.testing.assert_close(
        attack.store.get("probs"), F.softmax(soft_victim(images), dim=1).detach()
    )

    # The trained victim: every class the victim gives p >= 1e-8.
    attack, _ = _stepped(KnockoffMaps, digits_victim, pool)
    images, maps = attack.store.get("images"), attack.store.get("maps").float()
    likely = attack.store.get("probs") >= 1e-8
    true = _log_p_gradients(digits_victim, images)
    torch.testing.assert_close(maps[likely], true[likely], **HALF)

    # One class's maps: the predicted class's, with that class kept.
    attack, _ = _stepped(KnockoffMaps, digits_victim, pool, explanation=PREDICTED)
    images, classes = attack.store.get("images"), attack.store.get("classes")
    assert torch.equal(classes, digits_victim(images).argmax(dim=1))
    true = _log_p_gradients(digits_victim, images)[torch.arange(len(images)), classes]
    torch.testing.assert_close(attack.store.get("maps").float(), true, **HALF)


def test_maps_of_classes_below_1e_8_are_left_out(digits_victim, pool):
    # Such a class is flat in the clone's loss (log p clamped at 1e-8) and its map is not
    # read as d log p: it is kept as unknown (zeros), which the map term gives weight 0.
    attack, _ = _stepped(KnockoffMaps, digits_victim, pool)
    maps, probs = attack.store.get("maps").float(), attack.store.get("probs")
    unlikely = probs < 1e-8
    assert bool(unlikely.any()) and bool((~unlikely).any())
    assert maps[unlikely].abs().sum() == 0
    assert bool(maps[~unlikely].flatten(1).ne(0).any(dim=1).all())


def test_maps_past_float16s_range_are_unknown_not_infinite(digits_victim, pool):
    # Sign maps read as d log p (divided by p, down to 1e-8) pass float16's 65504, the
    # store's type: such an image's map of that class is left out, and the clone's loss
    # stays finite.
    from megex.defenses import build_defense

    sign = [build_defense("sign")]
    oracle = LocalOracle(digits_victim, budget=10_000, explanation=ALL, defenses=sign)
    attack = KnockoffMaps(pool, seed=0, query_batch=20, training="streaming")
    attack.setup(oracle, 10)
    attack.step(oracle)
    maps, probs = attack.store.get("maps").float(), attack.store.get("probs")
    assert torch.isfinite(maps).all()
    # Some classes the victim puts above 1e-8 are unknown (all zero): those that overflowed;
    # the likely ones are kept.
    unknown = (probs >= 1e-8) & (maps.flatten(2).abs().sum(dim=2) == 0)
    assert bool(unknown.any())
    assert bool(maps[probs > 0.5].flatten(1).ne(0).any(dim=1).all())
    assert math.isfinite(attack.replay(1))


# --- JBDA: gradients and augmentation rounds ------------------------------------------------


def test_jbda_clone_gradient_is_per_image_autograd(digits_victim, pool):
    attack, _ = _stepped(JBDA, digits_victim, pool, steps=0)
    attack.clone.train()
    x, labels = pool[:12], torch.arange(12) % 10
    got = attack.clone_gradient(x, labels)
    assert attack.clone.training  # its mode is given back
    torch.testing.assert_close(got, _per_image_gradient(attack.clone.eval(), x, labels))
    assert got.abs().sum() > 0


@pytest.mark.parametrize("explanation", [ALL, PREDICTED], ids=["all", "predicted"])
def test_jbda_maps_steps_along_the_victims_own_gradient(digits_victim, pool, explanation):
    attack, _ = _stepped(JBDAMaps, digits_victim, pool, explanation=explanation)
    images = attack.store.get("images")
    labels = attack.store.get("probs").argmax(dim=1)
    got = attack.direction(images, labels, 0)
    torch.testing.assert_close(got, _per_image_gradient(digits_victim, images, labels), **HALF)
    # Rows of the store from `start` on: the maps of the rows asked for.
    torch.testing.assert_close(
        attack.direction(images[5:9], labels[5:9], 5),
        _per_image_gradient(digits_victim, images[5:9], labels[5:9]),
        **HALF,
    )
    if explanation is PREDICTED:
        # A class the map does not explain: the clone's gradient stands in.
        other = (labels + 1) % 10
        torch.testing.assert_close(
            attack.direction(images, other, 0), attack.clone_gradient(images, other)
        )


def test_jbda_rounds_step_along_the_sign_that_flips_every_period(digits_victim, pool):
    lam = 0.15
    attack, oracle = _stepped(
        JBDA, digits_victim, pool[:20], steps=2, query_batch=10, step_size=lam, step_period=2
    )
    assert attack.rounds == 0 and attack.queue.shape[0] == 0 and len(attack.store) == 20

    def expected(sign: float) -> torch.Tensor:
        x = attack.store.get("images")
        labels = attack.store.get("probs").argmax(dim=1)
        g = _per_image_gradient(attack.clone.eval(), x, labels)
        return (x + sign * lam * g.sign()).clamp(0, 1)

    # Round 1 is what the next two requests send.
    first = expected(+1.0)
    attack.step(oracle)
    attack.step(oracle)
    assert attack.rounds == 1
    torch.testing.assert_close(attack.store.get("images")[20:40], first)
    assert not torch.equal(first, attack.store.get("images")[:20])

    # Rounds 2 (same sign) and 3 (flipped: period 2) on the 40 answers now kept.
    plus, minus = expected(+1.0), expected(-1.0)
    torch.testing.assert_close(attack._augment(), plus)
    torch.testing.assert_close(attack._augment(), minus)
    assert attack.rounds == 3 and not torch.equal(plus, minus)
    assert attack.details()["augmentation_rounds"] == 3


def test_jbda_maps_rounds_step_along_the_sign_of_the_stored_map(digits_victim, pool):
    attack, _ = _stepped(JBDAMaps, digits_victim, pool[:20], step_size=0.1)
    x = attack.store.get("images")
    labels = attack.store.get("probs").argmax(dim=1)
    maps = attack.store.get("maps").float()[torch.arange(20), labels]
    torch.testing.assert_close(attack._augment(), (x + 0.1 * maps.sign()).clamp(0, 1))


# --- Knockoff's choice of queries ----------------------------------------------------------


def _pool_rows(pool: torch.Tensor, images: torch.Tensor) -> list[int]:
    """The pool row each image is, exactly (-1 if none)."""
    same = (images.flatten(1).unsqueeze(1) == pool.flatten(1).unsqueeze(0)).all(dim=2)
    return [int(row.nonzero()[0]) if row.any() else -1 for row in same]


def _on_a_segment(image: torch.Tensor, pool: torch.Tensor) -> bool:
    """Whether image = lam * a + (1 - lam) * b for two pool images a, b and lam in [0, 1]."""
    p = pool.flatten(1).double()
    m = image.flatten().double()
    a, b = p.unsqueeze(1), p.unsqueeze(0)  # every pair (i, j)
    d = a - b
    lam = ((m - b) * d).sum(-1) / d.pow(2).sum(-1).clamp_min(1e-12)
    lam = lam.clamp(0, 1)
    residual = (lam.unsqueeze(-1) * a + (1 - lam.unsqueeze(-1)) * b - m).abs().amax(-1)
    return bool(residual.min() < 1e-5)


def test_random_selection_asks_every_pool_image_once_before_any_mixup(digits_victim, pool):
    small = pool[:30]
    attack, oracle = _stepped(Knockoff, digits_victim, small, steps=0, query_batch=7)
    for _ in range(5):  # 35 queries: the 30 pool images, then 5 mixup images
        attack.step(oracle)
        if attack.mixup_queries:
            assert bool(attack.asked.all())
    rows = _pool_rows(small, attack.store.get("images"))
    assert sorted(rows[:30]) == list(range(30))
    assert rows[:7] == attack.order[:7].tolist()  # a seeded random order
    assert attack.mixup_queries == 5 and attack.details()["pool_images_asked"] == 30
    assert attack.details()["mixup_queries"] == 5
    mixed = attack.store.get("images")[30:]
    assert all(row == -1 for row in rows[30:])
    assert float(mixed.min()) >= 0 and float(mixed.max()) <= 1
    assert all(_on_a_segment(image, small) for image in mixed)
    assert not _on_a_segment(torch.rand(1, 8, 8), small)  # the check can fail


def test_uncertainty_selection_asks_the_clones_least_certain_images(digits_victim, pool):
    attack, oracle = _stepped(
        Knockoff, digits_victim, pool, selection="uncertainty", training="streaming"
    )
    assert _pool_rows(pool, attack.store.get("images")) == attack.order[:20].tolist()
    attack.replay(5)  # a clone that is sure of some images and not of others
    candidates = torch.nonzero(~attack.asked).view(-1)
    with torch.no_grad():
        probs = F.softmax(attack.clone.eval()(pool[candidates]), dim=1)
    entropy = -(probs * probs.log()).sum(dim=1)
    top = candidates[entropy.argsort(descending=True)[:20]]
    attack.step(oracle)
    chosen = _pool_rows(pool, attack.store.get("images")[20:])
    assert sorted(chosen) == sorted(top.tolist())
    assert sorted(chosen) != sorted(candidates[:20].tolist())


def test_k_center_picks_the_farthest_point_from_centres_and_picks():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [4.0, 0.0], [9.0, 0.0], [10.0, 3.0]])
    centres = torch.tensor([[0.0, 0.0]])
    # (10, 3) is farthest from the centre; then (4, 0): 4 from the centre, 6.7 from (10, 3);
    # then (9, 0): 3.16 from (10, 3). Farthest from the centre alone would be 4, 3, 2.
    assert _k_center(points, centres, 3).tolist() == [4, 2, 3]
    assert _k_center(points, centres, 5).tolist() == [4, 2, 3, 1, 0]
    assert _k_center(points, torch.tensor([[10.0, 3.0], [0.0, 0.0]]), 1).tolist() == [2]


def test_kcenter_selection_is_greedy_k_center_in_the_clones_probabilities(digits_victim, pool):
    attack, oracle = _stepped(
        Knockoff, digits_victim, pool, selection="kcenter", query_batch=8, training="streaming"
    )
    attack.replay(5)
    asked = attack.asked.clone()
    with torch.no_grad():
        probs = F.softmax(attack.clone.eval()(pool), dim=1)
    # Greedy k-center written out: each pick the farthest from every asked or picked image.
    centres, picks = [int(i) for i in asked.nonzero()], []
    for _ in range(8):
        best, far = -1, -1.0
        for i in range(len(pool)):
            if asked[i] or i in picks:
                continue
            near = min(float((probs[i] - probs[j]).norm()) for j in centres + picks)
            if near > far:
                best, far = i, near
        picks.append(best)
    attack.step(oracle)
    assert _pool_rows(pool, attack.store.get("images")[8:]) == picks


# --- the answer store -------------------------------------------------------------------


def _answers(n: int, start: int = 0):
    rows = torch.arange(start, start + n, dtype=torch.float32)
    images = rows.view(-1, 1, 1, 1).expand(n, 1, 2, 2).clone()
    probs = F.softmax(torch.stack([rows, -rows, rows / 2], dim=1), dim=1)
    maps = torch.randn(n, 3, 1, 2, 2, generator=torch.Generator().manual_seed(start))
    return images, probs, maps, rows.long() % 3


def test_answer_store_keeps_every_row_past_its_first_capacity():
    store = AnswerStore((1, 2, 2), 3, (3, 1, 2, 2))
    kept = [_answers(100, start) for start in (0, 100, 200, 300)]
    for batch in kept:
        store.add(*batch)
    assert len(store) == 400 and store.fields["images"].shape[0] >= 400
    images, probs, maps, classes = (torch.cat(parts) for parts in zip(*kept))
    assert torch.equal(store.get("images"), images)
    assert torch.equal(store.get("probs"), probs)
    assert torch.equal(store.get("maps"), maps.half()) and store.get("maps").dtype == torch.float16
    assert torch.equal(store.get("classes"), classes)
    with pytest.raises(ValueError, match="pass maps and classes"):
        store.add(images[:2], probs[:2])


def test_answer_store_state_round_trip_and_reproducible_uniform_sample():
    store = AnswerStore((1, 2, 2), 3, (3, 1, 2, 2))
    store.add(*_answers(10))
    again = AnswerStore((1, 2, 2), 3, (3, 1, 2, 2))
    again.load_state_dict(store.state_dict())
    assert len(again) == 10
    for name in store.fields:
        assert torch.equal(again.get(name), store.get(name))

    a = store.sample(50, torch.Generator().manual_seed(4))
    b = again.sample(50, torch.Generator().manual_seed(4))
    for name in a:
        assert torch.equal(a[name], b[name])
    assert a["maps"].dtype == torch.float32
    # Rows drawn whole, with replacement (50 from 10).
    drawn = a["images"][:, 0, 0, 0].long()
    assert torch.equal(a["probs"], store.get("probs")[drawn])
    assert torch.equal(a["classes"], store.get("classes")[drawn])
    assert len(set(drawn.tolist())) < 50

    counts = torch.bincount(
        store.sample(20_000, torch.Generator().manual_seed(5))["images"][:, 0, 0, 0].long(),
        minlength=10,
    )
    assert int(counts.sum()) == 20_000 and counts.min() > 1_800 and counts.max() < 2_200

    plain = AnswerStore((1, 2, 2), 3)
    plain.add(*_answers(5)[:2])
    assert set(plain.sample(3, torch.Generator())) == {"images", "probs"}


def test_balanced_sampling_uses_every_answer_equally_often():
    store = AnswerStore((1, 2, 2), 3)
    store.add(*_answers(10)[:2])
    rng = torch.Generator().manual_seed(0)

    def drawn(n: int) -> list[int]:
        return store.sample(n, rng, "balanced")["images"][:, 0, 0, 0].long().tolist()

    assert sorted(drawn(5) + drawn(5)) == list(range(10))  # an epoch over the answers
    assert sorted(drawn(4) + drawn(6)) == list(range(10))
    first, second = drawn(3), drawn(3)
    assert not set(first) & set(second)  # the least used first: six different answers
    # A new answer starts level with the least used, not behind by every draw it missed.
    store.add(*_answers(2, start=10)[:2])
    uses = store.get("uses").tolist()
    assert uses[10:] == [2, 2]
    least = sorted(i for i, used in enumerate(uses) if used == 2)
    assert len(least) == 6 and sorted(drawn(6)) == least
    assert store.get("uses").tolist() == [3] * 12
    assert len(drawn(15)) == 15  # more than it holds: each once, then at random
    with pytest.raises(ValueError, match="sampling"):
        store.sample(3, rng, "x")


@pytest.mark.parametrize("training", ["after-queries", "streaming"])
def test_the_clone_learns_after_the_last_request_or_as_answers_come(digits_victim, pool, training):
    attack, oracle = _stepped(Knockoff, digits_victim, pool, training=training)
    before = copy.deepcopy(attack.clone.state_dict())
    learnt = attack.replay(4)  # after the first of 10 requests
    if training == "streaming":
        assert learnt is not None and attack.clone_updates == 4
    else:
        assert learnt is None and attack.clone_updates == 0
        assert all(torch.equal(before[k], v) for k, v in attack.clone.state_dict().items())
        for _ in range(9):
            attack.step(oracle)
        assert attack.replay(4) is not None and attack.clone_updates == 4


# --- refusals -----------------------------------------------------------------------------


def test_pool_tensor_refuses_what_is_not_a_pool_of_images():
    with pytest.raises(ValueError, match=r"pool: expected .*\(N, C, H, W\).*got list"):
        pool_tensor([[0.5]])
    with pytest.raises(ValueError, match=r"pool: expected .*got Tensor"):
        pool_tensor(torch.rand(4, 8, 8))
    with pytest.raises(ValueError, match="pool: expected"):
        pool_tensor(torch.rand(0, 1, 8, 8))
    with pytest.raises(ValueError, match=r"pool: images must be in \[0, 1\]"):
        pool_tensor(torch.rand(4, 1, 8, 8) * 255)
    with pytest.raises(ValueError, match=r"pool: images must be in \[0, 1\]"):
        pool_tensor(torch.rand(4, 1, 8, 8) - 0.5)
    images, described = pool_tensor(torch.rand(4, 1, 8, 8, dtype=torch.float64))
    assert images.dtype == torch.float32 and described["size"] == 4
    made = Pool(images, "folder:x", "4 images", "abc", "folder")
    assert pool_tensor(made)[1]["spec"] == "folder:x"


def test_an_attack_refuses_a_pool_of_another_image_shape(digits_victim):
    attack = Knockoff(torch.rand(10, 1, 4, 4))
    with pytest.raises(ValueError, match=r"pool: images of shape \(1, 4, 4\), but the victim "):
        attack.setup(LocalOracle(digits_victim), 10)


@pytest.mark.parametrize("name", ["knockoff", "knockoff-maps", "jbda", "jbda-maps"])
def test_unknown_and_bad_settings_are_refused_naming_the_setting(name):
    images = torch.rand(10, 1, 8, 8)
    with pytest.raises(TypeError, match="unknown setting 'lerning_rate'"):
        ATTACKS[name](images, lerning_rate=1)
    with pytest.raises(ValueError, match="query_batch"):
        ATTACKS[name](images, query_batch=0)
    with pytest.raises(ValueError, match="clone_optimizer"):
        ATTACKS[name](images, clone_optimizer="rmsprop")
    if name.startswith("knockoff"):
        with pytest.raises(ValueError, match="selection"):
            ATTACKS[name](images, selection="x")
        # A choice by the clone needs a clone that learns between requests.
        with pytest.raises(ValueError, match="selection: 'uncertainty'.*'streaming'"):
            ATTACKS[name](images, selection="uncertainty", training="after-queries")
        with pytest.raises(ValueError, match="training"):
            ATTACKS[name](images, training="x")
    else:
        with pytest.raises(ValueError, match="step_size"):
            ATTACKS[name](images, step_size=0)
        with pytest.raises(ValueError, match="training"):
            ATTACKS[name](images, training="after-queries")
    with pytest.raises(ValueError, match="sampling"):
        ATTACKS[name](images, sampling="x")
    if name.endswith("-maps"):
        with pytest.raises(ValueError, match="explanation_loss"):
            ATTACKS[name](images, explanation_loss=-1)
        with pytest.raises(ValueError, match="explanation"):
            ATTACKS[name](images, explanation="gradient")


# --- an interrupted run resumes exactly ---------------------------------------------------


def _untimed(rows: list[dict]) -> list[dict]:
    """Metrics rows without their wall-clock times (the only figures a resume may change)."""
    return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in rows]


@pytest.mark.parametrize(
    "name, training",
    [("knockoff-maps", "after-queries"), ("knockoff-maps", "streaming"), ("jbda-maps", None)],
)
def test_interrupted_and_resumed_run_equals_uninterrupted(
    tmp_path, digits_victim, digits_test, pool, name, training
):
    x, y = digits_test
    evaluator = Evaluator.from_victim(digits_victim, x, y)
    # jbda-maps runs out of pool images after 40 queries and augments from then on.
    images = pool[:40]
    budget, every = 120, 40
    settings = dict(seed=3, query_batch=20, batch_size=16, clone_updates_per_1k_queries=250)
    if training is not None:
        settings["training"] = training

    def run(run_dir, **kwargs):
        oracle = kwargs.pop("oracle", None) or LocalOracle(
            digits_victim, budget=budget, explanation=ALL
        )
        result = megex.run(
            ATTACKS[name](images, **settings), oracle, budget,
            evaluator=evaluator, eval_every=every, run_dir=run_dir, progress=False,
            service_state=oracle.state_dict, **kwargs,
        )  # fmt: skip
        return result, oracle

    straight, _ = run(tmp_path / "a")

    def interrupt(iteration, spent):
        if spent >= 60:
            raise KeyboardInterrupt

    partial, _ = run(tmp_path / "b", callback=interrupt)
    assert not partial.finished and not (tmp_path / "b" / "result.json").exists()
    saved = RunFolder(tmp_path / "b").load_checkpoint()
    assert saved["attack"]["store"]["size"] == 40  # the checkpoint at the last evaluation

    second = LocalOracle(digits_victim, budget=budget, explanation=ALL)
    second.load_state_dict(saved["service"])
    resumed, _ = run(tmp_path / "b", oracle=second, resume=True)
    assert resumed.finished and resumed.queries_used == straight.queries_used == budget
    assert second.queries_used == budget
    assert resumed.clone_accuracy == straight.clone_accuracy
    assert _untimed(resumed.metrics) == _untimed(straight.metrics)
    assert [m["queries"] for m in straight.metrics] == [40, 80, 120]
    assert resumed.details == straight.details
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["attack"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["attack"]
    assert all(torch.equal(a["clone"][k], b["clone"][k]) for k in a["clone"])
    for field in a["store"]:
        if field != "size":
            assert torch.equal(a["store"][field], b["store"][field]), field


def test_a_budget_below_one_request_is_a_clear_error(digits_victim, pool):
    with pytest.raises(ValueError, match=r"\(50 = one request: query_batch 50\); raise the budg"):
        megex.run(Knockoff(pool, seed=0), LocalOracle(digits_victim, budget=10), progress=False)
