"""DFME's zeroth-order estimator on its own, and DFME unchanged by taking it out."""

from __future__ import annotations

import math
from typing import Any

import torch

from megex.attacks import DFME
from megex.attacks.base import LOG_EPS, disagreement
from megex.attacks.dfme import forward_difference_gradient, probe_points, random_directions
from megex.engine import run
from megex.models import build_classifier
from megex.oracle import LocalOracle
from megex.victim import Victim


class _InlineEstimatorDFME(DFME):
    """DFME's generator step as it was written before the estimator became functions."""

    def generator_step(self, oracle: Any) -> dict[str, Any]:
        c = self.config
        z = self.sample_latent(c.batch_size)
        pre, _ = self.generate(z)
        base = pre.detach()
        n, dims = base.shape[0], base[0].numel()
        u = torch.randn(n, c.directions, dims, generator=self.rng).to(base.device)
        u = u / u.norm(dim=2, keepdim=True)
        shifted = base.view(n, 1, dims) + c.epsilon * u
        points = torch.cat([base.view(n, 1, dims), shifted], dim=1).view(-1, *base.shape[1:])
        images = self.to_query(points, z)
        answer = oracle.query(images.cpu())
        with torch.no_grad():
            losses = disagreement(self.clone(images), answer.probabilities.to(base.device), c.loss)
            losses = self.disagreement_now() * losses
            if c.victim_confidence > 0:
                k = answer.probabilities.shape[1]
                targets = self.latent_classes(z, k).cpu().repeat_interleave(c.directions + 1)
                logp = answer.probabilities.clamp_min(LOG_EPS).log()
                conf = logp[torch.arange(len(targets)), targets].to(base.device)
                losses = losses + c.victim_confidence * conf
        losses = losses.view(n, c.directions + 1)
        diffs = (losses[:, 1:] - losses[:, :1]).unsqueeze(2)
        grad = (dims / (c.directions * c.epsilon)) * (diffs * u).sum(dim=1)
        objective = -(pre * grad.view_as(pre)).sum() / n
        if c.class_balance > 0:
            clone_logits = self.clone(self.to_query(pre, z))
            objective = objective - c.class_balance * self.balance_term(clone_logits)
        probs = answer.probabilities.to(base.device)
        info = {"generator_loss": float(losses[:, 0].mean())}
        return self.finish_generator_step(objective, images.detach(), probs, None, info)


def test_dfme_is_bit_identical_with_the_estimator_as_functions():
    torch.manual_seed(0)
    victim = Victim(build_classifier("small_cnn", 10, 1, 8), (1, 8, 8), 10).eval()
    settings = {
        "batch_size": 16,
        "nz": 16,
        "ngf": 8,
        "directions": 3,
        "victim_confidence": 0.5,
        "class_balance": 0.1,
        "replay_size": 500,
        "seed": 4,
    }
    finished = []
    for attack in (DFME(**settings), _InlineEstimatorDFME(**settings)):
        oracle = LocalOracle(victim, budget=1500, seed=4)
        run(attack, oracle, 1500, progress=False)
        finished.append(attack)
    new, old = finished
    assert new.generator_updates == old.generator_updates > 5
    for a, b in (
        (new.generator.state_dict(), old.generator.state_dict()),
        (new.clone.state_dict(), old.clone.state_dict()),
    ):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_estimator_is_unbiased_for_a_linear_loss_and_aligns_as_sqrt_m_over_d():
    gen = torch.Generator().manual_seed(0)
    dims, n = 64, 20000
    slope = torch.randn(dims, generator=gen)
    base = torch.randn(n, 1, 8, 8, generator=gen)
    for m in (1, 4):
        u = random_directions(n, m, dims, gen)
        assert u.shape == (n, m, dims)
        assert torch.allclose(u.norm(dim=2), torch.ones(n, m), atol=1e-5)
        points = probe_points(base, u, 1e-2)
        assert points.shape == ((m + 1) * n, 1, 8, 8)
        assert torch.equal(points.view(n, m + 1, dims)[:, 0], base.view(n, dims))
        losses = points.flatten(1).double() @ slope.double()
        grad = forward_difference_gradient(losses, u.double(), 1e-2)
        assert grad.shape == (n, dims)
        # Unbiased: the mean estimate is the slope, up to the sampling error of n draws
        # (relative size about sqrt(dims / (m n)) = 0.06 at most here).
        error = (grad.mean(0) - slope).norm() / slope.norm()
        assert error < 0.1, error
        cosine = torch.nn.functional.cosine_similarity(grad, slope.double().expand(n, -1))
        assert abs(float(cosine.mean()) - math.sqrt(m / dims)) < 0.05


def test_probe_points_of_a_channels_last_colour_batch_follow_the_logical_order():
    # On a CPU the generator runs channels-last, and a 3-channel batch is then not laid out
    # in (C, H, W) order; its points must be the same as those of the contiguous batch.
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(4, 3, 6, 6, generator=gen)
    u = random_directions(4, 2, 3 * 6 * 6, gen)
    strided = base.to(memory_format=torch.channels_last)
    assert not strided.is_contiguous()
    assert torch.equal(probe_points(strided, u, 0.1), probe_points(base, u, 0.1))
    moved = probe_points(base, u, 0.1).view(4, 3, -1)[:, 1:] - base.view(4, 1, -1)
    assert torch.allclose(moved, 0.1 * u, atol=1e-6)
