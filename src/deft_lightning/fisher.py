"""FisherTune's parameter scores (Zhao et al., CVPR 2025; docs/methods.md §4): pure functions, no Lightning.

**Diagonal Fisher** over source batches, with every BatchNorm in eval mode (running statistics,
so one image's gradient does not depend on the others)::

    F = E_x E_y [ (∇_θ L(f_θ(x), y))² ]

``L`` is the pixel cross-entropy of one image (mean over its labelled pixels, ignore 255).
Label sources: ``"empirical"`` (``y`` = the labels) or ``"true"`` (``y`` drawn per pixel from the
model's softmax, the slides' definition; one draw per image). Estimators:

- ``"per_sample"`` (default): the mean over images of the squared per-image gradient, computed
  with ``torch.func.vmap(grad(...))`` over chunks of ``chunk_size`` images (memory: one
  per-image gradient per image of the chunk). BackPACK (``BatchGrad``/``DiagGGN``) was not
  tried: it is not installed, and its extensions cover plain ``nn`` layers but not timm/smp
  blocks (attention, ``LayerNorm`` in ViTs, depthwise convolutions with padding modules) that
  ``torch.func`` differentiates as they are.
- ``"micro_batch"``: the mean over micro-batches of ``micro_batch_size`` images of the squared
  gradient of the micro-batch's loss (its pixel cross-entropy over all its labelled pixels),
  one ordinary backward per micro-batch: cheaper, biased towards zero as the micro-batch grows
  (the squared *mean* gradient); ``micro_batch_size=1`` is the per-sample estimate.

**Domain shift of the features** (the slides never define ε_μ, ε_σ; **our reading**): for every
encoder stage ``l`` the channel means ``μ_l`` and standard deviations ``σ_l`` of its features over
all images and positions, for ``x`` and for the shifted view ``x'`` (same labels; by default the
library's LAB style augmentation), then::

    ε_μ = mean_l RMS_c[(μ'_lc − μ_lc) / σ_lc],     ε_σ = mean_l RMS_c[log(σ'_lc / σ_lc)]

both zero exactly when ``x' = x``, scale-free per channel.

**ΔF and DR-FIM** (the slides' equations, elementwise)::

    ΔF     = |F(x, y) − F(x', y)| / (min(F(x, y), F(x', y)) + ε)
    DR-FIM = F(x, y) + exp(−(ε_μ + ε_σ)) · ΔF

**Variational estimate** (the slides' "stable" estimator): ``q = N(θ̂, Λ⁻¹)`` diagonal, prior
``p = N(θ̂, τ² I)``, minimise over ``Λ``::

    E_q[L(θ)] + γ KL(q ‖ p),   KL = ½ Σ_i [1/(τ² Λ_i) − 1 + log(τ² Λ_i)]

whose optimum, with ``E_q[L] ≈ L(θ̂) + ½ Tr(F Λ⁻¹)``, is ``Λ = F/γ + τ⁻²``. Here ``E_q[L]`` is
a Monte-Carlo estimate with reparameterised antithetic samples ``θ̂ ± Λ^(−1/2) ⊙ ξ``, ``ξ ~ N(0, I)``
(one pair per step, one batch per step), and natural-gradient steps on the precision (see
:func:`variational_precision`), starting from the prior ``Λ = τ⁻²``. The DR-FIM in ``Λ`` is the slides' final
formula as written::

    DR-FIM = γ (Λ_x − τ⁻² + exp(−(ε_μ + ε_σ)) |Λ_x − Λ_x'| / (min(Λ_x, Λ_x') + ε/γ))

Substituting ``Λ = F/γ + τ⁻²`` its first term is ``F`` but its second is
``γ |F − F'| / (min(F, F') + γ τ⁻² + ε)``: the slides keep τ⁻² inside the ``min`` (docs/methods.md).

Every estimator takes ``reduce``, applied to every accumulated sum (images, counts, feature
moments, the variational gradient): under DDP pass an all-reduce (sum) so every rank ends with
the same scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .data.labels import IGNORE_INDEX
from .data.transforms import lab_style_augmentation

Batch = tuple[Tensor, Tensor]  # (images in [0, 1], labels)
Reduce = Callable[[Tensor], Tensor]
LabelSource = Literal["empirical", "true"]
Estimator = Literal["per_sample", "micro_batch"]


def _identity(tensor: Tensor) -> Tensor:
    return tensor


@contextmanager
def eval_mode(module: nn.Module):
    """Every submodule in eval mode (BN running statistics, no dropout), restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def pixel_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the labelled pixels (``ignore_index=255``); 0 if there are none."""
    losses = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    labelled = (labels != IGNORE_INDEX).sum()
    return losses.sum() / labelled.clamp(min=1)


def sample_labels(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One label per pixel drawn from the softmax over the class dimension (dim 1)."""
    classes = logits.shape[1]
    probs = logits.detach().movedim(1, -1).reshape(-1, classes).softmax(-1)
    draws = torch.multinomial(probs, 1, generator=generator)
    return draws.view(logits.shape[0], *logits.shape[2:])


def _parameters(model: nn.Module, names: Sequence[str] | None) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    names = list(named) if names is None else list(names)
    missing = [n for n in names if n not in named]
    if missing:
        raise KeyError(f"no parameters named {missing[:5]} in {type(model).__name__}")
    return {n: named[n].detach() for n in names}


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[Batch],
    names: Sequence[str] | None = None,
    *,
    labels: LabelSource = "empirical",
    estimator: Estimator = "per_sample",
    micro_batch_size: int = 1,
    chunk_size: int = 4,
    generator: torch.Generator | None = None,
    reduce: Reduce = _identity,
) -> dict[str, Tensor]:
    """Diagonal Fisher ``{name: F}`` of ``model``'s parameters ``names`` (default: all) over ``batches``.

    ``model`` maps images to logits (B, K, ...); it runs in eval mode. ``generator`` draws the
    labels of the true Fisher. See the module docstring for the estimators.
    """
    if labels not in ("empirical", "true"):
        raise ValueError(f"labels must be 'empirical' or 'true', got {labels!r}")
    if estimator not in ("per_sample", "micro_batch"):
        raise ValueError(f"estimator must be 'per_sample' or 'micro_batch', got {estimator!r}")
    params = _parameters(model, names)
    # Every other tensor detached: the gradients must not build a graph back to the decoder's parameters.
    fixed = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in params}
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    count = torch.zeros((), dtype=torch.float64, device=next(iter(params.values())).device)

    def loss(p: dict[str, Tensor], images: Tensor, targets: Tensor) -> Tensor:
        return pixel_cross_entropy(functional_call(model, {**fixed, **p}, (images,)), targets)

    def image_loss(p: dict[str, Tensor], image: Tensor, target: Tensor) -> Tensor:
        return loss(p, image.unsqueeze(0), target.unsqueeze(0))

    per_image_grads = vmap(grad(image_loss), in_dims=(None, 0, 0))
    with eval_mode(model):
        for images, targets in batches:
            if labels == "true":
                with torch.no_grad():
                    targets = sample_labels(model(images), generator)
            step = chunk_size if estimator == "per_sample" else micro_batch_size
            for start in range(0, images.shape[0], step):
                part = slice(start, start + step)
                if estimator == "per_sample":
                    grads = per_image_grads(params, images[part], targets[part])
                    for n, g in grads.items():
                        sums[n] += g.square().sum(0)
                    count += grads[next(iter(grads))].shape[0]
                else:
                    grads = grad(loss)(params, images[part], targets[part])
                    for n, g in grads.items():
                        sums[n] += g.square()
                    count += 1
    count = reduce(count)
    if count == 0:
        raise ValueError("diagonal_fisher: no images in the estimation batches")
    return {n: (reduce(s) / count).to(s.dtype) for n, s in sums.items()}


# ---- the domain shift of the encoder features ------------------------------------------------
def lab_style_shift(generator: torch.Generator | None = None) -> Callable[[Tensor], Tensor]:
    """The default shift ``x -> x'``: DeFT's LAB restyling of every image (same labels)."""

    def shift(images: Tensor) -> Tensor:
        labels = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        return lab_style_augmentation(images, labels, generator=generator)[0][images.shape[0]:]

    return shift


def encoder_feature_maps(net: nn.Module) -> Callable[[Tensor], list[Tensor]]:
    """``images -> encoder features`` of a :class:`~deft_lightning.net.SegmentationNet`: the
    stages with channels, without smp's identity stage (the input itself, ``features[0]``)."""

    def features(images: Tensor) -> list[Tensor]:
        out = net.encoder(net.normalize(images))
        maps = out[0] if isinstance(out, tuple) else out[1:]  # ViT encoders: (maps, prefix tokens)
        return [f for f in maps if f.shape[1] > 0]

    return features


def _moments(features: list[Tensor]) -> list[Tensor]:
    """Per stage ``[Σ x_c, Σ x_c², n]`` over images and positions ((B, C, ...) maps)."""
    moments = []
    for f in features:
        flat = f.detach().double().transpose(0, 1).reshape(f.shape[1], -1)
        n = torch.full((f.shape[1],), flat.shape[1], dtype=flat.dtype, device=flat.device)
        moments.append(torch.stack([flat.sum(1), flat.square().sum(1), n]))
    return moments


def _mean_std(moments: Tensor) -> tuple[Tensor, Tensor]:
    total, squares, n = moments
    mean = total / n
    return mean, (squares / n - mean.square()).clamp(min=0).sqrt()


def feature_shift(
    features: Callable[[Tensor], list[Tensor]],
    batches: Iterable[Batch],
    shifted: Iterable[Batch],
    *,
    module: nn.Module | None = None,
    delta: float = 1e-6,
    reduce: Reduce = _identity,
) -> tuple[Tensor, Tensor]:
    """``(ε_μ, ε_σ)`` between the features of the images of ``batches`` (``x``) and of ``shifted``
    (``x'``, batch by batch); ``module`` is put in eval mode meanwhile, ``delta`` guards a zero σ."""
    clean: list[Tensor] | None = None
    moved: list[Tensor] | None = None
    with eval_mode(module or nn.Identity()), torch.no_grad():
        for (images, _), (images_shifted, _) in zip(batches, shifted, strict=True):
            a, b = _moments(features(images)), _moments(features(images_shifted))
            clean = a if clean is None else [x + y for x, y in zip(clean, a)]
            moved = b if moved is None else [x + y for x, y in zip(moved, b)]
    if clean is None:
        raise ValueError("feature_shift: no estimation batches")
    eps_mu, eps_sigma = [], []
    for a, b in zip(clean, moved):
        (mu, sigma), (mu2, sigma2) = _mean_std(reduce(a)), _mean_std(reduce(b))
        eps_mu.append(((mu2 - mu) / (sigma + delta)).square().mean().sqrt())
        eps_sigma.append(((sigma2 + delta) / (sigma + delta)).log().square().mean().sqrt())
    return torch.stack(eps_mu).mean(), torch.stack(eps_sigma).mean()


# ---- scores --------------------------------------------------------------------------------
def delta_fisher(fisher: Tensor, fisher_shifted: Tensor, epsilon: float = 1e-8) -> Tensor:
    """``ΔF = |F(x,y) − F(x',y)| / (min(F(x,y), F(x',y)) + ε)``."""
    return (fisher - fisher_shifted).abs() / (torch.minimum(fisher, fisher_shifted) + epsilon)


def dr_fim(fisher: Tensor, fisher_shifted: Tensor, eps_mu: Tensor | float, eps_sigma: Tensor | float,
           epsilon: float = 1e-8) -> Tensor:
    """``DR-FIM = F(x,y) + exp(−(ε_μ+ε_σ)) ΔF``."""
    weight = math.exp(-(float(eps_mu) + float(eps_sigma)))
    return fisher + weight * delta_fisher(fisher, fisher_shifted, epsilon)


def variational_dr_fim(precision: Tensor, precision_shifted: Tensor, eps_mu: Tensor | float,
                       eps_sigma: Tensor | float, gamma: float, tau: float, epsilon: float = 1e-8) -> Tensor:
    """The slides' DR-FIM in the variational precisions, as written:
    ``γ (Λ_x − τ⁻² + exp(−(ε_μ+ε_σ)) |Λ_x − Λ_x'| / (min(Λ_x, Λ_x') + ε/γ))``."""
    weight = math.exp(-(float(eps_mu) + float(eps_sigma)))
    domain = (precision - precision_shifted).abs() / (torch.minimum(precision, precision_shifted) + epsilon / gamma)
    return gamma * (precision - tau ** -2 + weight * domain)


def variational_fisher(precision: Tensor, gamma: float, tau: float) -> Tensor:
    """``F = γ (Λ − τ⁻²)``: the Fisher a precision stands for at the optimum (ΔF/F scores)."""
    return gamma * (precision - tau ** -2)


def segmentation_loss(model: nn.Module) -> Callable[[dict[str, Tensor], Batch], Tensor]:
    """``(parameters, batch) -> pixel cross-entropy of the batch`` with those parameters."""

    def loss(params: dict[str, Tensor], batch: Batch) -> Tensor:
        images, labels = batch
        return pixel_cross_entropy(functional_call(model, params, (images,)), labels)

    return loss


def variational_precision(
    loss: Callable[[dict[str, Tensor], Batch], Tensor],
    mean: Mapping[str, Tensor],
    batches: Sequence[Batch],
    *,
    gamma: float = 1e-6,
    tau: float = 0.1,
    steps: int = 20,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    reduce: Reduce = _identity,
    world_size: int = 1,
) -> dict[str, Tensor]:
    """Diagonal precisions ``Λ`` minimising ``E_q[L] + γ KL(q ‖ N(θ̂, τ² I))``, ``q = N(θ̂, Λ⁻¹)``.

    Natural-gradient steps on the precision (variational online Newton, Khan et al. 2018)::

        Λ ← (1 − η_t) Λ + η_t (2 ∂E_q[L]/∂v / γ + τ⁻²),    v = Λ⁻¹

    the stationary condition of the objective in ``v``, with ``∂E_q[L]/∂v`` from reparameterised
    antithetic samples ``θ̂ ± √v ⊙ ξ`` of the current ``q`` on one batch (for a quadratic loss
    ``2 ∂E_q[L]/∂v`` is unbiased for ``diag(H)``, so the fixed point is ``F/γ + τ⁻²``). ``η_t`` is
    ``step_size`` or, by default, ``1/(t+1)`` (the running mean over the steps). ``Λ`` stays at or
    above the prior precision ``τ⁻²`` (``F ≥ 0``).

    ``loss(params, batch)`` is the loss with ``params`` (e.g. :func:`segmentation_loss`), ``mean``
    the posterior mean ``θ̂``; step ``t`` uses ``batches[t % len(batches)]``. The curvature estimates
    are ``reduce``-d and divided by ``world_size`` (the mean over DDP ranks); pass the same
    ``generator`` seed on every rank so the noise is shared. Run a model in eval mode.
    """
    if not batches:
        raise ValueError("variational_precision: no estimation batches")
    if gamma <= 0 or tau <= 0 or steps < 1:
        raise ValueError(f"variational_precision needs gamma > 0, tau > 0, steps >= 1; got {gamma}, {tau}, {steps}")
    prior = tau ** -2
    precision = {n: torch.full_like(m, prior) for n, m in mean.items()}
    for step in range(steps):
        variance = {n: (1.0 / p).requires_grad_(True) for n, p in precision.items()}
        noise = {n: torch.randn(m.shape, dtype=m.dtype, device=m.device, generator=generator)
                 for n, m in mean.items()}
        plus = {n: mean[n].detach() + variance[n].sqrt() * noise[n] for n in mean}
        minus = {n: mean[n].detach() - variance[n].sqrt() * noise[n] for n in mean}
        batch = batches[step % len(batches)]
        expected_loss = 0.5 * (loss(plus, batch) + loss(minus, batch))
        grads = torch.autograd.grad(expected_loss, list(variance.values()))
        eta = 1.0 / (step + 1) if step_size is None else step_size
        for (n, p), g in zip(precision.items(), grads):
            target = 2.0 * reduce(g) / world_size / gamma + prior
            precision[n] = ((1 - eta) * p + eta * target).clamp(min=prior).detach()
    return precision


# ---- selection -----------------------------------------------------------------------------
SelectionMode = Literal["global", "per_layer"]


def _count(fraction: float, total: int) -> int:
    """``⌈fraction · total⌉``, robust to float noise (0.05 · 100 is 5, not 6)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return min(total, math.ceil(round(fraction * total, 9)))


def entry_ranks(scores: Mapping[str, Tensor], mode: SelectionMode = "global") -> dict[str, Tensor]:
    """Rank of every entry (0 = highest score), over all tensors (``"global"``) or within its own
    tensor (``"per_layer"``). Ties go to the earlier entry (tensor order, then flat index); NaN
    ranks last. int64 ranks, shaped like the scores."""
    if mode not in ("global", "per_layer"):
        raise ValueError(f"selection mode must be 'global' or 'per_layer', got {mode!r}")

    def ranks_of(flat: Tensor) -> Tensor:
        key = torch.nan_to_num(flat.double(), nan=-math.inf)
        order = torch.argsort(key, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(order.numel(), device=order.device)
        return ranks

    if mode == "per_layer":
        return {n: ranks_of(s.flatten()).view(s.shape) for n, s in scores.items()}
    flat = ranks_of(torch.cat([s.flatten() for s in scores.values()]))
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = flat[start:start + s.numel()].view(s.shape)
        start += s.numel()
    return out


def masks_from_ranks(ranks: Mapping[str, Tensor], fraction: float, mode: SelectionMode = "global") -> dict[str, Tensor]:
    """Boolean masks keeping ``⌈fraction·N⌉`` entries (global) or ``⌈fraction·N_l⌉`` per tensor."""
    if mode == "per_layer":
        return {n: r < _count(fraction, r.numel()) for n, r in ranks.items()}
    keep = _count(fraction, sum(r.numel() for r in ranks.values()))
    return {n: r < keep for n, r in ranks.items()}


def select_entries(scores: Mapping[str, Tensor], fraction: float, mode: SelectionMode = "global") -> dict[str, Tensor]:
    """``{name: bool mask}`` keeping the top ``fraction`` of entries by score (paper: about 5 %),
    over all tensors (``"global"``, default) or per tensor (``"per_layer"``); ties broken
    deterministically (:func:`entry_ranks`)."""
    return masks_from_ranks(entry_ranks(scores, mode), fraction, mode)
