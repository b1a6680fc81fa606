"""Attacks that try to stay under a query monitor (megex.detection).

A data-free attack's queries are generator outputs, on which the victim is often unsure:
an out-of-distribution monitor that averages 1 - max probability over a key's recent queries
sees them coming within a hundred queries. An attacker that knows this has two ways to look
confident, both settings here:

- selection (`latent_candidates`): draw that many latents for every query it will send and
  send the images its own clone is most confident on (compute, not queries: the clone
  stands in for the victim, and grows more like it as the attack goes on); the generator's
  objective can also reward the victim's confidence (`victim_confidence`, which every attack
  has);
- padding (`padding_per_query`): after every attack image, that many images on which the
  victim was confident before, each with a little noise (`padding_noise`) so that no two
  queries are the same (a distance-based monitor such as PRADA sees exact repeats). The
  pool starts with plain grey images at 11 levels and keeps the most confident images the
  attacker has been answered on, attack images included. Padding costs queries: a run of
  budget B sends B / (1 + padding_per_query) attack images; padding answers still train the
  clone (replay), as every paid answer does.

What evasion costs is measured as clone accuracy against the same attack without it, and
what it buys as the monitors' detection rate (docs/results/).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..oracle import Answer, Oracle
from .config import AT_LEAST_0, COUNT, COUNT_0, setting
from .dfme import DFME, DFMEConfig
from .megex import MEGEX, MEGEXConfig

__all__ = ["EvasiveDFME", "EvasiveDFMEConfig", "EvasiveMEGEX", "EvasiveMEGEXConfig"]

_CANDIDATES_HELP = (
    "latents drawn per query sent; the images the attacker's clone is most confident on "
    "are sent (1: no selection), so that the victim's answers look in-distribution"
)


_PADDING_HELP = (
    "queries sent after every attack image, drawn from images the victim was confident on "
    "(each copy is a query), so that a window of queries looks confident on average"
)
_NOISE_HELP = "std of the Gaussian noise added to every padding image (in [0, 1] pixel units)"


@dataclass(frozen=True)
class EvasiveMEGEXConfig(MEGEXConfig):
    latent_candidates: int = setting(8, _CANDIDATES_HELP, COUNT, "evasion")
    padding_per_query: int = setting(0, _PADDING_HELP, COUNT_0, "evasion")
    padding_noise: float = setting(0.03, _NOISE_HELP, AT_LEAST_0, "evasion")


@dataclass(frozen=True)
class EvasiveDFMEConfig(DFMEConfig):
    latent_candidates: int = setting(8, _CANDIDATES_HELP, COUNT, "evasion")
    padding_per_query: int = setting(0, _PADDING_HELP, COUNT_0, "evasion")
    padding_noise: float = setting(0.03, _NOISE_HELP, AT_LEAST_0, "evasion")


# Padding pool: how many images it keeps; padding is drawn from the entries within
# POOL_MARGIN of the most confident one's confidence, at most POOL_DRAW of them.
POOL_SIZE = 512
POOL_DRAW = 64
POOL_MARGIN = 0.02


class _Evasion:
    """Confident latents and padding, around any attack's queries."""

    def iteration_cost(self) -> int:
        return super().iteration_cost() * (1 + self.config.padding_per_query)

    def setup(self, oracle: Oracle, iterations: int) -> None:
        super().setup(oracle, iterations)
        channels, size, _ = oracle.input_shape
        levels = torch.linspace(0, 1, 11).view(-1, 1, 1, 1)
        # Grey images to start from; their confidence is learnt from their answers.
        self.pool_images = levels.expand(11, channels, size, size).clone()
        self.pool_confidence = torch.full((11,), float("nan"))

    def ask(self, oracle: Oracle, x: torch.Tensor, explanation=None) -> Answer:
        r = self.config.padding_per_query
        if r == 0:
            return super().ask(oracle, x, explanation)
        untried = torch.isnan(self.pool_confidence)
        if untried.any():
            # The grey images' confidence, once, before any attack image is sent: padding
            # must look confident from the first window on.
            probe = super().ask(oracle, self.pool_images[untried])
            self.pool_confidence[untried] = probe.probabilities.float().amax(dim=1).cpu()
            self.observe(
                self.pool_images[untried].to(self.config.device),
                probe.probabilities.to(self.config.device),
            )
        n = x.shape[0]
        x = x.detach().cpu()
        pads, drawn = self._padding(n * r)
        # Each attack image followed by its r padding images, in one request.
        mixed = torch.cat([x.unsqueeze(1), pads.view(n, r, *x.shape[1:])], dim=1)
        answer = super().ask(oracle, mixed.view(-1, *x.shape[1:]), explanation)
        is_attack = torch.zeros(n, 1 + r, dtype=torch.bool)
        is_attack[:, 0] = True
        is_attack = is_attack.flatten()
        confidence = answer.probabilities.float().amax(dim=1).cpu()
        self._remember(x, confidence[is_attack], drawn, confidence[~is_attack])
        # The padding's answers are paid for: the clone learns from them by replay.
        pad_probs = answer.probabilities[~is_attack].to(self.config.device)
        self.observe(pads.to(self.config.device), pad_probs)
        return _rows(answer, is_attack)

    def _padding(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` padding images and the pool entries they were drawn from."""
        confidence = self.pool_confidence
        top = confidence.topk(min(POOL_DRAW, len(confidence)))
        best = top.indices[top.values >= top.values[0] - POOL_MARGIN]
        # The pool lives on the host; draws come from the attack's generator wherever it is.
        d = self.rng.device
        drawn = best[torch.randint(len(best), (count,), generator=self.rng, device=d).cpu()]
        noise = torch.randn(count, *self.pool_images.shape[1:], generator=self.rng, device=d)
        noise = noise.cpu()
        pads = (self.pool_images[drawn] + self.config.padding_noise * noise).clamp(0, 1)
        return pads, drawn

    def _remember(
        self,
        attack_images: torch.Tensor,
        attack_confidence: torch.Tensor,
        drawn: torch.Tensor,
        pad_confidence: torch.Tensor,
    ) -> None:
        """Update the pool: each drawn entry's confidence from its padding's answers (their
        mean), then the attack images join it; the most confident POOL_SIZE stay. Padding
        images never join (noise on noise would drift)."""
        total = torch.zeros(len(self.pool_confidence)).index_add_(0, drawn, pad_confidence)
        count = torch.zeros(len(self.pool_confidence)).index_add_(
            0, drawn, torch.ones_like(pad_confidence)
        )
        seen = count > 0
        self.pool_confidence[seen] = total[seen] / count[seen]
        images = torch.cat([self.pool_images, attack_images])
        confidence = torch.cat([self.pool_confidence, attack_confidence])
        keep = torch.nan_to_num(confidence, nan=2.0).topk(min(POOL_SIZE, len(confidence)))
        self.pool_images = images[keep.indices]
        self.pool_confidence = confidence[keep.indices]

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["padding_pool"] = {"images": self.pool_images, "confidence": self.pool_confidence}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.pool_images = state["padding_pool"]["images"]
        self.pool_confidence = state["padding_pool"]["confidence"]

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


class EvasiveMEGEX(_Evasion, MEGEX):
    name = "megex-evasive"
    config_class = EvasiveMEGEXConfig


class EvasiveDFME(_Evasion, DFME):
    name = "dfme-evasive"
    config_class = EvasiveDFMEConfig


def _rows(answer: Answer, keep: torch.Tensor) -> Answer:
    """The rows `keep` of an answer."""
    import dataclasses

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[keep]

    return dataclasses.replace(
        answer,
        probabilities=answer.probabilities[keep],
        labels=answer.labels[keep],
        logits=pick(answer.logits),
        explanation=pick(answer.explanation),
    )
