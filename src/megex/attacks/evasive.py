"""Attacks that try to stay under a query monitor (megex.detection).

A data-free attack's queries are generator outputs, on which the victim is often unsure:
an out-of-distribution monitor that averages 1 - max probability over a key's recent queries
sees them coming within a hundred queries. An attacker that knows this can keep its queries
to images the victim is confident on, without spending queries to find them: it draws
`latent_candidates` latents for every query it will send, and sends the images its own clone
is most confident on (compute, not queries; the clone stands in for the victim, and grows
more like it as the attack goes on). The generator's own objective can also reward the
victim's confidence (`victim_confidence`, a setting every attack has).

What evasion costs is measured as clone accuracy against the same attack without it, and what
it buys as the monitors' detection rate (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import COUNT, setting
from .dfme import DFME, DFMEConfig
from .megex import MEGEX, MEGEXConfig

__all__ = ["EvasiveDFME", "EvasiveDFMEConfig", "EvasiveMEGEX", "EvasiveMEGEXConfig"]

_CANDIDATES_HELP = (
    "latents drawn per query sent; the images the attacker's clone is most confident on "
    "are sent (1: no selection), so that the victim's answers look in-distribution"
)


@dataclass(frozen=True)
class EvasiveMEGEXConfig(MEGEXConfig):
    latent_candidates: int = setting(8, _CANDIDATES_HELP, COUNT, "evasion")


@dataclass(frozen=True)
class EvasiveDFMEConfig(DFMEConfig):
    latent_candidates: int = setting(8, _CANDIDATES_HELP, COUNT, "evasion")


class _ConfidentLatents:
    """Latents whose images the attacker's clone is most confident on."""

    def sample_latent(self, n: int) -> torch.Tensor:
        k = self.config.latent_candidates
        z = super().sample_latent(n * k)
        if k == 1:
            return z
        model = self.eval_model()
        was_training = (self.generator.training, model.training)
        # Eval mode: the selection must not move batch-norm statistics.
        self.generator.eval()
        model.eval()
        try:
            with torch.no_grad():
                _, x = self.generate(z)
                confidence = F.softmax(model(x), dim=1).amax(dim=1)
        finally:
            self.generator.train(was_training[0])
            model.train(was_training[1])
        chosen = confidence.topk(n).indices.sort().values
        return z[chosen]


class EvasiveMEGEX(_ConfidentLatents, MEGEX):
    name = "megex-evasive"
    config_class = EvasiveMEGEXConfig


class EvasiveDFME(_ConfidentLatents, DFME):
    name = "dfme-evasive"
    config_class = EvasiveDFMEConfig
