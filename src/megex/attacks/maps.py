"""Explanation maps read as gradients: d log p / dx from what a service returns.

A service may explain with gradients, input x gradient or integrated gradients, of the
probability, the log-probability or the logit, of one class or of every class. MEGEX needs
d log p_k / dx; these functions undo what they can and mark the rest unknown (zeros), and
differentiate the generator's disagreement objective through the maps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..explain import Explanation, output_values
from ..oracle import Answer
from .training import LOG_EPS, disagreement, victim_targets

__all__ = [
    "INTEGRATED_GRADIENTS_MIN_PROBABILITY",
    "class_combination",
    "disagreement_gradient",
    "clone_path_gradient",
    "explained_class",
    "frozen_batch_norm",
    "log_probability_gradients",
    "map_matching_loss",
    "relative_map_error",
]

# Integrated gradients average dp_k/dx along the path from the baseline. Divided by p_k at the
# image, a class that the image makes unlikely gets a map that is far too large and points
# elsewhere: on Fashion-MNIST (LeNet-5, 16 steps) below p_k = 1e-3 the undone map's norm was a
# median 20-20,000x that of the true d log p_k, with cosine < 0.2, and such maps drove the
# generator to overflow. Those classes are left out, as classes the service hides are.
INTEGRATED_GRADIENTS_MIN_PROBABILITY = 1e-3


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
    """d log p / dx from an explanation: (N, K, C, H, W) for 'all', else (N, C, H, W).

    A probability map that cannot be turned into d log p (its class shown below 1e-8, or too
    unlikely for an integrated-gradients map to stand for it) comes back as zeros: unknown,
    not zero. A non-finite value in a map is unknown too."""
    spec = answer.explanation_spec
    maps = _undo_attribution(answer.explanation.to(x.device), x, spec)
    finite = torch.isfinite(maps)
    if maps.dim() == 5:
        # A pixel unknown in one class's map is unknown in all: the conversions and the
        # projection over classes mix the classes at each pixel.
        finite = finite.all(dim=1, keepdim=True)
    maps = torch.where(finite, maps, 0.0)
    shown = answer.probabilities.to(x.device)
    p = shown.clamp_min(LOG_EPS)
    if spec.output == "log_probability":
        return maps
    # A class shown below LOG_EPS (exactly 0 when rounded, top-k or label only) is left out:
    # its map divided by the clamped p would not be d log p, and it is flat in the clone's
    # loss anyway (log p clamped there).
    floor = INTEGRATED_GRADIENTS_MIN_PROBABILITY if spec.method == "integrated_gradients" else 0
    floor = max(floor, LOG_EPS)
    if maps.dim() == 5:
        if spec.output == "probability":
            # (One multiply by per-class weights: the maps are the largest tensor here.)
            scale = torch.where(shown >= floor, 1.0 / p, 0.0)
            return maps * scale.view(*p.shape, 1, 1, 1)
        # logits: d log p_k = d z_k - sum_j p_j d z_j
        return maps - class_combination(p, maps).unsqueeze(1)
    cls = explained_class(answer).to(x.device)
    if spec.output == "probability":
        p_c = shown.gather(1, cls.view(-1, 1)).view(-1, 1, 1, 1)
        usable = p_c >= floor
        return torch.where(usable, maps / p_c.clamp_min(LOG_EPS), 0.0)
    # One logit's gradient alone cannot give d log p_c; (1 - p_c) d z_c is its main term.
    return maps * (1 - p.gather(1, cls.view(-1, 1))).view(-1, 1, 1, 1)


def class_combination(weights: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """sum_k weights[n, k] * maps[n, k] for (N, K) weights and (N, K, C, H, W) maps.

    A batched matrix product: faster than broadcasting the weights over the maps and summing.
    """
    n, k = weights.shape
    flat = maps.reshape(n, k, -1)
    return torch.bmm(weights.to(flat.dtype).unsqueeze(1), flat).view(n, *maps.shape[2:])


def explained_class(answer: Answer) -> torch.Tensor:
    """The class each image's map explains: its predicted class, or the one asked for."""
    target = answer.explanation_spec.target
    if target == "predicted":
        return answer.labels
    return torch.full_like(answer.labels, int(target))


def disagreement_gradient(
    answer: Answer,
    dlogp: torch.Tensor,
    probs: torch.Tensor,
    clone_logits: torch.Tensor,
    loss: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The disagreement's gradient with respect to the images, from the maps' d log p / dx:
    (the victim's part, read off the maps; the clone's part, a term for autograd; the loss's
    value), for maps of every class (N, K, C, H, W) or of one class (N, C, H, W)."""
    k = probs.shape[1]
    if dlogp.dim() == 5 and loss == "kl":
        # KL(pV || pS): d/dx = sum_k pV_k (log pV_k - log pS_k) d log pV_k
        #                      - sum_k pV_k d log pS_k   (as sum_k d pV_k = 0).
        p = probs.clamp_min(LOG_EPS)
        p = p / p.sum(dim=1, keepdim=True)
        log_ps = F.log_softmax(clone_logits, dim=1)
        victim_grad = class_combination(p * (p.log() - log_ps.detach()), dlogp)
        # Enters the objective as minus the clone's part of the loss, as in the 'l1' branch.
        clone_term = (p * log_ps).sum()
        loss_value = disagreement(clone_logits.detach(), probs, "kl").mean()
    elif dlogp.dim() == 5:
        lv = victim_targets(probs)
        s = torch.sign(lv - clone_logits.detach())
        victim_grad = class_combination(s - s.mean(dim=1, keepdim=True), dlogp) / k
        clone_term = (s * clone_logits).sum() / k
        loss_value = (lv - clone_logits.detach()).abs().mean()
    elif loss == "kl":
        raise ValueError(
            "loss: 'kl' needs explanations of every class (target 'all'); with one "
            "class's map use 'l1'"
        )
    else:
        cls = explained_class(answer).to(probs.device).view(-1, 1)
        lpv = probs.clamp_min(LOG_EPS).log().gather(1, cls)
        lps = F.log_softmax(clone_logits, dim=1).gather(1, cls)
        s = torch.sign(lpv - lps.detach())
        victim_grad = s.view(-1, 1, 1, 1) * dlogp
        clone_term = (s * lps).sum()
        loss_value = (lpv - lps.detach()).abs().mean()
    return victim_grad, clone_term, loss_value


# --- the clone learns the maps: input-gradient matching (Jacobian matching, Sobolev) ------


def relative_map_error(grad: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image, how far the clone's input gradient is from the map's: the relative
    squared error ||g - t||^2 / (||g||^2 + ||t||^2), in [0, 2]."""
    error = (grad - target).pow(2).flatten(1).sum(dim=1)
    size = (grad.pow(2) + target.pow(2)).flatten(1).sum(dim=1) + 1e-12
    return error / size


def map_matching_loss(
    clone: nn.Module,
    x: torch.Tensor,
    probs: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    spec: Explanation | None,
    loss: str,
    weight: float,
    map_error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = relative_map_error,
    path_gradient: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Disagreement plus input-gradient matching (Jacobian matching, Sobolev training):
    the clone's d (sum_k w_k log pS_k) / dx against the victim's, `target`, from its maps.

    A relative squared error per image (`map_error`), bounded in [0, 2], so that one weight
    suits any victim and output scale and images with vanishing maps cannot blow the clone
    up; images without a map (weights all 0) are left out of this term, and so are pixels
    whose gradient the map does not tell (0: where input x gradient or integrated gradients
    cannot be divided by the input). Integrated-gradients maps are matched by the clone's
    own path average (`clone_path_gradient`, or `path_gradient(x, probs, weights, spec)`
    where given), not by its gradient at x.
    """
    x = x.detach().requires_grad_(True)
    logits = clone(x)
    value = disagreement(logits, probs, loss).mean()
    if spec is not None and spec.method == "integrated_gradients":
        if path_gradient is None:
            grad = clone_path_gradient(clone, x.detach(), probs, weights, spec)
        else:
            grad = path_gradient(x.detach(), probs, weights, spec)
    else:
        logp = F.log_softmax(logits, dim=1)
        (grad,) = torch.autograd.grad((weights * logp).sum(), x, create_graph=True)
    known = (target != 0).to(grad.dtype)
    error = map_error(grad * known, target)
    has_map = (weights != 0).any(dim=1).to(error.dtype)
    matched = (has_map * error).sum() / has_map.sum().clamp_min(1)
    return value + weight * matched


@contextlib.contextmanager
def frozen_batch_norm(model: nn.Module) -> Iterator[None]:
    """Batch normalisation layers of `model` in eval mode for the block (restored after):
    images passed through for a gradient must not enter the running statistics."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(norms, modes):
            m.train(mode)


def clone_path_gradient(
    clone: nn.Module,
    x: torch.Tensor,
    probs: torch.Tensor,
    weights: torch.Tensor,
    spec: Explanation,
) -> torch.Tensor:
    """The clone's counterpart of a projected integrated-gradients map: the mean over the
    path's points of the clone's gradient of its output (in the map's output space), turned
    into 'd log p' with the victim's shown probabilities at x exactly as
    log_probability_gradients turns the victim's map. Differentiable (create_graph).

    An integrated-gradients map is a path average, not the gradient at x (measured on
    Fashion-MNIST: cosine 0.3 to 0.5 with d log p_k at x for likely classes), so the clone's
    gradient at x would be matched to the wrong thing; this counterpart is the same
    functional of the clone as the map is of the victim. Costs `steps` forward and
    double-backward passes of the clone per image."""
    steps, baseline = int(spec.params["steps"]), float(spec.params["baseline"])
    n, k = weights.shape
    p = probs.to(weights.dtype)
    if spec.output == "probability":
        coefficients = torch.where(weights != 0, weights / p.clamp_min(LOG_EPS), 0.0)
    elif spec.output == "logit" and spec.target == "all":
        # sum_k w_k (dz_k - sum_j p_j dz_j) = sum_j (w_j - p_j sum_k w_k) dz_j
        coefficients = weights - p * weights.sum(dim=1, keepdim=True)
    elif spec.output == "logit":
        # One class's logit map stands for (1 - p_c) dz_c (log_probability_gradients).
        coefficients = weights * (1 - p)
    else:
        coefficients = weights
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    points = baseline + alphas.view(-1, 1, 1, 1, 1) * (x - baseline).unsqueeze(0)
    points = points.reshape(steps * n, *x.shape[1:]).requires_grad_(True)
    # Batch normalisation in eval mode here: the victim's maps come from its eval mode, and
    # the path's darker images must not enter the clone's running statistics.
    with frozen_batch_norm(clone):
        logits = clone(points)
    values = output_values(logits, spec.output)
    combined = (values.view(steps, n, k) * coefficients.unsqueeze(0)).sum()
    (grad,) = torch.autograd.grad(combined, points, create_graph=True)
    return grad.view(steps, n, *x.shape[1:]).mean(dim=0)
