"""MEGEX (Miura et al., 2021): the generator learns from the explanations the service returns.

The generator maximises DFME's disagreement L(x) = mean_k |lv_k(x) - ls_k(x)| between the
victim's recovered logits lv = log p - mean(log p) and the clone's logits ls. With
s = sign(lv - ls) and s_bar = mean_k s:

    dL/dx = (1/K) [ sum_k (s_k - s_bar) d log p_k/dx  -  sum_k s_k d ls_k/dx ]

The clone term comes from autograd; the victim term from an explanation of every class
("exact"). When the service explains one class c only, the loss is |log pV_c - log pS_c|,
whose gradient needs only that class ("single-class"). Either way a generator query costs 1.

Beyond the paper, each a named option measured in benchmarks/RESULTS.md:
the generator also raises the victim's log-probability of a class its latent picks, read off
the maps (`victim_confidence`); the clone also learns the maps themselves by matching its own
input gradients to them (`explanation_loss`); plus the shared loop's options (replay, clone
steps on the generator's queries, brightness prior, constant schedule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..explain import Explanation
from ..oracle import Answer, Oracle
from .base import LOG_EPS, Attack, AttackConfig, disagreement, victim_targets

__all__ = ["MEGEX", "MEGEXConfig", "log_probability_gradients"]


@dataclass
class MEGEXConfig(AttackConfig):
    # What to ask the service for; None takes whatever explanation it offers by default.
    explanation: Explanation | None = None
    # Train the clone on the explanations too (double backprop): match the clone's input
    # gradients of log-probabilities to the returned maps, as a relative squared error with
    # this weight. For maps of every class one random projection over classes per image
    # keeps it to one extra backward pass; 0 turns it off.
    explanation_loss: float = 1.0
    # Ask for the explanation on clone-step queries as well (the same query count: one
    # image is one query either way), so the explanation loss sees every fresh batch.
    explain_clone_queries: bool = False
    # None: 1.0 when the service explains one class only (the generator would otherwise
    # collapse onto few classes), 0 when it explains every class (the latent then picks
    # balanced classes already). See AttackConfig.class_balance.
    class_balance: float | None = None

    def validate(self) -> None:
        super().validate()
        if float(self.explanation_loss) < 0:
            raise ValueError(f"explanation_loss: expected >= 0, got {self.explanation_loss}")


def _undo_attribution(maps: torch.Tensor, x: torch.Tensor, spec: Explanation) -> torch.Tensor:
    """Turn input-times-gradient style maps back into (average) gradients where possible."""
    if spec.method not in ("input_x_gradient", "integrated_gradients"):
        return maps
    baseline = spec.params.get("baseline", 0.0) if spec.method == "integrated_gradients" else 0.0
    delta = x - baseline
    if maps.dim() == 5:
        delta = delta.unsqueeze(1)
    safe = delta.abs() > 1e-3
    return torch.where(safe, maps / torch.where(safe, delta, torch.ones_like(delta)), 0.0)


def log_probability_gradients(answer: Answer, x: torch.Tensor) -> torch.Tensor:
    """d log p / dx from an explanation: (N, K, C, H, W) for 'all', else (N, C, H, W)."""
    spec = answer.explanation_spec
    maps = _undo_attribution(answer.explanation.to(x.device), x, spec)
    shown = answer.probabilities.to(x.device)
    p = shown.clamp_min(LOG_EPS)
    if spec.output == "log_probability":
        return maps
    if maps.dim() == 5:
        if spec.output == "probability":
            # A class shown as exactly 0 (rounded, top-k, label only) hides its true p:
            # dividing its map by the floor would blow it up, so it is left out instead.
            # (One multiply by per-class weights: the maps are the largest tensor here.)
            scale = torch.where(shown > 0, 1.0 / p, 0.0)
            return maps * scale.view(*p.shape, 1, 1, 1)
        # logits: d log p_k = d z_k - sum_j p_j d z_j
        return maps - class_combination(p, maps).unsqueeze(1)
    cls = _explained_class(answer).to(x.device)
    if spec.output == "probability":
        return maps / p.gather(1, cls.view(-1, 1)).view(-1, 1, 1, 1)
    # One logit's gradient alone cannot give d log p_c; (1 - p_c) d z_c is its main term.
    return maps * (1 - p.gather(1, cls.view(-1, 1))).view(-1, 1, 1, 1)


def class_combination(weights: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """sum_k weights[n, k] * maps[n, k] for (N, K) weights and (N, K, C, H, W) maps.

    A batched matrix product: faster than broadcasting the weights over the maps and summing.
    """
    n, k = weights.shape
    flat = maps.reshape(n, k, -1)
    return torch.bmm(weights.to(flat.dtype).unsqueeze(1), flat).view(n, *maps.shape[2:])


def _explained_class(answer: Answer) -> torch.Tensor:
    target = answer.explanation_spec.target
    if target == "predicted":
        return answer.labels
    return torch.full_like(answer.labels, int(target))


class MEGEX(Attack):
    name = "megex"
    config_class = MEGEXConfig

    def queries_per_generator_step(self) -> int:
        return 1

    def setup(self, oracle: Oracle) -> None:
        super().setup(oracle)
        self.explanation_used: Explanation | None = None
        # (answer, its d log p / dx) while the generator step that paid for it runs.
        self._dlogp_of: tuple[Answer, torch.Tensor] | None = None

    def generator_step(self, oracle: Oracle) -> dict[str, Any]:
        c = self.config
        z = self.sample_latent(c.batch_size)
        _, x = self.generate(z)
        request = c.explanation if c.explanation is not None else True
        answer = oracle.query(x.detach().cpu(), explanation=request)
        if answer.explanation is None or answer.explanation_spec is None:
            raise RuntimeError("megex: the oracle returned no explanation; MEGEX needs one")
        self.explanation_used = answer.explanation_spec
        dlogp = log_probability_gradients(answer, x.detach())
        # The clone step on these answers (train_on_generator_queries) needs them again.
        self._dlogp_of = (answer, dlogp)
        probs = answer.probabilities.to(x.device)
        clone_logits = self.clone(x)
        n, k = probs.shape
        if dlogp.dim() == 5:
            lv = victim_targets(probs)
            s = torch.sign(lv - clone_logits.detach())
            victim_grad = class_combination(s - s.mean(dim=1, keepdim=True), dlogp) / k
            clone_term = (s * clone_logits).sum() / k
            loss_value = (lv - clone_logits.detach()).abs().mean()
        else:
            cls = _explained_class(answer).to(x.device).view(-1, 1)
            lpv = probs.clamp_min(LOG_EPS).log().gather(1, cls)
            lps = F.log_softmax(clone_logits, dim=1).gather(1, cls)
            s = torch.sign(lpv - lps.detach())
            victim_grad = s.view(-1, 1, 1, 1) * dlogp
            clone_term = (s * lps).sum()
            loss_value = (lpv - lps.detach()).abs().mean()
        # The weight of the disagreement objective itself (the paper's: 1).
        weight = self.disagreement_now()
        victim_grad = weight * victim_grad
        clone_term = weight * clone_term
        if c.victim_confidence > 0:
            # The latent picks the class (argmax of its first K values: uniform, so the
            # queries are class-balanced).
            targets = self.latent_classes(z, k).to(x.device)
            if dlogp.dim() == 5:
                # Its gradient is read off the all-class maps.
                confidence = dlogp[torch.arange(n, device=x.device), targets]
                keep = self.confidence_mask(probs, targets).view(-1, 1, 1, 1)
                victim_grad = victim_grad + c.victim_confidence * keep * confidence
            else:
                # Only the predicted class's map: where it is the latent's class, the victim's
                # gradient raises it; elsewhere the clone stands in for the victim (its own
                # log-probability of the latent's class, by autograd, no queries).
                hit = (targets == _explained_class(answer).to(x.device)).float()
                hit = hit * self.confidence_mask(probs, targets)
                victim_grad = victim_grad + c.victim_confidence * hit.view(-1, 1, 1, 1) * dlogp
                lps_t = F.log_softmax(clone_logits, dim=1).gather(1, targets.view(-1, 1))
                lps_t = lps_t.clamp_max(math.log(c.confidence_cap)).view(-1)
                clone_term = clone_term - c.victim_confidence * ((1 - hit) * lps_t).sum()
        # Ascend L: the victim term enters through the image with its gradient held fixed.
        objective = -((x * victim_grad.detach()).sum() - clone_term) / n
        balance = c.class_balance
        if balance is None:
            balance = 0.0 if dlogp.dim() == 5 else 1.0
        if balance > 0:
            objective = objective - balance * self.balance_term(clone_logits)
        self.generator_opt.zero_grad(set_to_none=True)
        self.clone_opt.zero_grad(set_to_none=True)
        objective.backward()
        self.generator_opt.step()
        self.clone_opt.zero_grad(set_to_none=True)
        # These answers are paid for: keep them, and learn from them now if asked to.
        self.observe(x.detach(), probs)
        info = {"generator_loss": float(loss_value)}
        if c.train_on_generator_queries:
            info["generator_query_loss"] = self.clone_update(x.detach(), probs, answer)
        self._dlogp_of = None
        return info

    def clone_query_explanation(self) -> Any:
        c = self.config
        if not (c.explain_clone_queries and c.explanation_loss > 0):
            return None
        return c.explanation if c.explanation is not None else True

    def clone_loss(
        self, x: torch.Tensor, probs: torch.Tensor, answer: Answer | None = None
    ) -> torch.Tensor:
        c = self.config
        if c.explanation_loss <= 0 or answer is None or answer.explanation is None:
            return super().clone_loss(x, probs, answer)
        x = x.detach().requires_grad_(True)
        logits = self.clone(x)
        loss = disagreement(logits, probs, c.loss).mean()
        cached = self._dlogp_of
        if cached is not None and cached[0] is answer:
            target = cached[1]
        else:
            target = log_probability_gradients(answer, x.detach())
        logp = F.log_softmax(logits, dim=1)
        n, k = logp.shape
        if target.dim() == 5:
            # E_v[(v.(Js - Jv))^2] = ||Js - Jv||^2 for v ~ N(0, I): one backward, unbiased.
            v = torch.randn(n, k, generator=self.rng).to(x.device)
            target = class_combination(v, target)
            selected = (v * logp).sum()
        else:
            cls = _explained_class(answer).to(x.device).view(-1, 1)
            selected = logp.gather(1, cls).sum()
        (grad,) = torch.autograd.grad(selected, x, create_graph=True)
        # Relative squared error, per image, bounded in [0, 2]: one weight suits any victim and
        # output scale, and images with vanishing maps cannot blow the clone up.
        error = (grad - target).pow(2).flatten(1).sum(dim=1)
        size = (grad.pow(2) + target.pow(2)).flatten(1).sum(dim=1) + 1e-12
        return loss + c.explanation_loss * (error / size).mean()

    def details(self) -> dict[str, Any]:
        spec = self.explanation_used
        if spec is None:
            return {"explanation": None}
        if spec.target == "all":
            kind = (
                "exact (all classes)"
                if spec.method == "gradient"
                else "all classes, approximate maps"
            )
        elif spec.output == "logit":
            # d log p_c is approximated by (1 - p_c) d z_c (log_probability_gradients).
            kind = "single class, approximated from one logit"
        else:
            kind = "single class"
        return {"explanation": spec.to_dict(), "generator_gradient": kind}
