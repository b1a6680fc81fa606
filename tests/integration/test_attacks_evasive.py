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


def test_padding_interleaves_confident_images_and_returns_the_attack_rows(
    digits_victim, monkeypatch
):
    from megex.attacks import evasive

    oracle = LocalOracle(digits_victim, seed=0)
    attack = _attack("megex-evasive", oracle, padding_per_query=3, latent_candidates=1)
    x = torch.rand(8, 1, 8, 8)
    sent = []
    real_query = oracle.query

    def spy(images, **kwargs):
        sent.append(images.clone())
        return real_query(images, **kwargs)

    oracle.query = spy
    answer = attack.ask(oracle, x, Explanation("gradient", target="all"))
    # The 11 grey images are probed once, alone, before any attack image.
    probe, request = sent
    assert probe.shape[0] == 11 and (probe.flatten(1).std(dim=1) == 0).all()
    assert oracle.queries_used == 11 + 8 * 4
    # Every attack image first, then its three padding images.
    assert torch.equal(request[0::4], x)
    pads = torch.cat([request[i::4] for i in (1, 2, 3)])
    assert pads.min() >= 0 and pads.max() <= 1
    assert len({tuple(p.flatten().tolist()) for p in pads}) == len(pads)
    honest = LocalOracle(digits_victim, seed=0).query(
        x, explanation=Explanation("gradient", target="all")
    )
    torch.testing.assert_close(answer.probabilities, honest.probabilities)
    torch.testing.assert_close(answer.explanation, honest.explanation)
    # The pool learnt the grey images' confidence, and padding draws from its best entries.
    assert not torch.isnan(attack.pool_confidence).any()
    monkeypatch.setattr(evasive, "POOL_MARGIN", 0.3)
    attack.pool_confidence = torch.rand(len(attack.pool_confidence))
    _, drawn = attack._padding(500)
    best = attack.pool_confidence.max()
    assert (attack.pool_confidence[drawn] >= best - 0.3).all()
    assert len(drawn.unique()) == int((attack.pool_confidence >= best - 0.3).sum())


def test_padding_makes_the_stream_look_confident_and_is_paid_for(digits_victim):
    from megex.detection import RecordingOracle

    windows = {}
    for padding in (0, 3):
        oracle = RecordingOracle(LocalOracle(digits_victim, seed=0))
        attack = ATTACKS["megex-evasive"](
            seed=0, batch_size=16, ngf=8, padding_per_query=padding, latent_candidates=1
        )
        result = run(attack, oracle, 3200, progress=False)
        assert result.queries_used == oracle.queries_used
        assert attack.iteration_cost() == 16 * 2 * (1 + padding)
        probs = oracle.stream().probabilities
        windows[padding] = (1 - probs.amax(dim=1)).mean().item()
    assert windows[3] < 0.6 * windows[0]
