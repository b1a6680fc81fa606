"""The query generator at every image size, unchanged at the sizes it had before."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megex.attacks import DFME
from megex.models import GeneratorA, build_classifier, build_generator
from megex.victim import Victim


def _doubling_pre_activation(gen: GeneratorA, z: torch.Tensor) -> torch.Tensor:
    """DFME's GeneratorA forward as it was written for multiples of 4: two doublings."""
    out = gen.l1(z).view(z.shape[0], 2 * gen.ngf, gen.image_size // 4, gen.image_size // 4)
    out = gen.bn0(out)
    out = F.interpolate(out, scale_factor=2)
    out = F.leaky_relu(gen.bn1(gen.conv1(out)), 0.2)
    out = F.interpolate(out, scale_factor=2)
    out = F.leaky_relu(gen.bn2(gen.conv2(out)), 0.2)
    return gen.bn3(gen.conv3(out))


@pytest.mark.parametrize("size,channels", [(8, 1), (28, 1), (32, 3)])
def test_sizes_that_are_multiples_of_4_are_made_exactly_as_before(size, channels):
    torch.manual_seed(0)
    gen = build_generator("generator_a", size, channels, nz=16, ngf=8)
    assert gen.l1.out_features == 2 * 8 * (size // 4) ** 2
    z = torch.randn(6, 16)
    assert torch.equal(gen.pre_activation(z), _doubling_pre_activation(gen, z))
    gen.eval()
    assert torch.equal(gen.pre_activation(z), _doubling_pre_activation(gen, z))


@pytest.mark.parametrize("size,channels", [(14, 1), (56, 1), (56, 3), (10, 3)])
def test_other_sizes_are_made_at_their_size(size, channels):
    torch.manual_seed(0)
    gen = build_generator("generator_a", size, channels, nz=16, ngf=8)
    with torch.no_grad():
        x, y = gen(torch.randn(4, 16)), gen(torch.randn(4, 16))
    assert x.shape == (4, channels, size, size)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # Every pixel depends on the latent (no border left constant by the upsampling).
    assert bool(((x - y).abs().amax(dim=(0, 1)) > 0).all())


def test_generator_sizes_are_checked():
    with pytest.raises(ValueError, match="whole number >= 4"):
        build_generator("generator_a", 3, 1)
    with pytest.raises(ValueError, match="whole number >= 4"):
        build_generator("generator_a", 14.0, 1)


def test_an_attack_on_a_14x14_victim_queries_14x14_images():
    torch.manual_seed(0)
    victim = Victim(build_classifier("lenet5", 10, 1, 14), (1, 14, 14), 10).eval()
    from megex.oracle import LocalOracle

    oracle = LocalOracle(victim, budget=10_000)
    attack = DFME(batch_size=8, nz=16, ngf=8, seed=0)
    attack.setup(oracle, iterations=2)
    assert attack.generator.image_size == 14
    pre, x = attack.generate(attack.sample_latent(3))
    assert pre.shape == x.shape == (3, 1, 14, 14)
    attack.step(oracle)
    assert oracle.queries_used == attack.iteration_cost()
