"""Attacks that choose confident queries to stay under a query monitor."""

import pytest
import torch

from megex.attacks import ATTACKS
from megex.engine import run
from megex.explain import Explanation
from megex.oracle import LocalOracle


def _attack(name, oracle, **settings):
    if name.startswith("megex"):
        settings.setdefault("explanation", Explanation("gradient", target="all"))
    attack = ATTACKS[name](seed=0, batch_size=16, ngf=8, **settings)
    attack.setup(oracle, iterations=10)
    return attack


def _clone_confidence(attack, z):
    """As the selection sees it: generator and clone in eval mode."""
    model = attack.eval_model()
    attack.generator.eval()
    model.eval()
    try:
        with torch.no_grad():
            _, x = attack.generate(z)
            return torch.softmax(model(x), dim=1).amax(dim=1)
    finally:
        attack.generator.train()
        model.train()


@pytest.mark.parametrize("name", ["megex-evasive", "dfme-evasive"])
def test_latents_are_those_the_clone_is_most_confident_on(digits_victim, name):
    oracle = LocalOracle(digits_victim, seed=0)
    attack = _attack(name, oracle, latent_candidates=8)
    buffers = [b.clone() for b in attack.generator.buffers()]
    state = attack.rng.get_state()
    chosen = attack.sample_latent(16)
    assert chosen.shape == (16, attack.config.nz)
    # The generator's batch-norm statistics are untouched and the modes restored.
    for before, after in zip(buffers, attack.generator.buffers()):
        assert torch.equal(before, after)
    assert attack.generator.training and attack.clone.training
    # The same 128 candidates again: the chosen 16 are the clone's most confident, in order.
    attack.rng.set_state(state)
    candidates = torch.randn(128, attack.config.nz, generator=attack.rng)
    confidence = _clone_confidence(attack, candidates)
    top = confidence.topk(16).indices.sort().values
    assert torch.equal(chosen, candidates[top])
    assert _clone_confidence(attack, chosen).min() >= confidence.median()


@pytest.mark.parametrize("name", ["megex-evasive", "dfme-evasive"])
def test_selection_costs_no_queries(digits_victim, name):
    oracle = LocalOracle(digits_victim, seed=0)
    attack = ATTACKS[name](seed=0, batch_size=16, ngf=8, latent_candidates=4)
    result = run(attack, oracle, 1200, progress=False)
    assert result.queries_used == oracle.queries_used
    assert oracle.queries_used <= 1200
    assert oracle.queries_used >= 1200 - attack.iteration_cost()
