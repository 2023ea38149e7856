"""FisherTune: finetune only the encoder entries that matter for the task and for domain shift
(Zhao et al., CVPR 2025; docs/methods.md §4; scores in :mod:`deft_lightning.fisher`).

**Scores** (``score``), computed once on ``estimation_batches`` source batches before the first
encoder step (after the decoder warm-up when there is one, so the Fisher sees a trained
decoder), every BatchNorm in eval mode:

- ``random``: uniform random scores (the slides' "Random" row);
- ``fisher``: ``F(x, y)``; ``delta_fisher``: ``ΔF``; ``dr_fim``: ``F + exp(−(ε_μ+ε_σ)) ΔF``;
- ``estimator="direct"``: ``F`` by per-image squared gradients (or squared micro-batch gradients);
  ``"variational"``: the precisions ``Λ_x``, ``Λ_x'`` of the variational estimate and the slides'
  DR-FIM formula in ``Λ`` (``fisher``/``delta_fisher`` then use ``F = γ(Λ − τ⁻²)``).

``x'`` is the shifted view of the estimation images (``shift``: ``"lab_style"``, DeFT's LAB
restyling, by default; ``"identity"``; or ``"package.module:factory"``, a function
``factory(generator) -> (images -> images)``).

**Selection**: the top ``fraction`` of encoder entries by score, over the whole encoder
(``selection="global"``) or per parameter tensor (``"per_layer"``), ties broken by position;
the decoder is fully trainable. With ``final_fraction`` the kept fraction grows linearly from
``fraction`` to ``final_fraction`` over ``grow_steps`` steps (entries are only ever added, by
rank; an added entry's optimizer state is zeroed when it joins).

**Masked update**: the gradient of every unselected entry is zeroed before the optimizer step
(so gradient clipping and the AdamW moments see only selected entries), and after the step every
unselected entry is restored from a copy of its start value (``torch.where``), so neither
momentum nor weight decay (coupled or decoupled) can move it: unselected entries stay
bit-identical. Encoder BN running statistics are buffers, not entries, and keep moving in train
mode.

**Cache** (``score_cache``): the estimated ingredients (``F, F'`` or ``Λ, Λ'``, and ``ε_μ, ε_σ``)
go to a safetensors file whose metadata holds a SHA-256 key of the net's weights at estimation,
the estimation batches and the estimation settings; a later run with the same key loads it (the
score type, fraction and selection mode may differ), and a file with another key is refused
with an error naming it.

**Checkpoint**: the masks (and, with a growing fraction, the ranks) are the module's extra state,
so a resumed run continues with the same masks, bit for bit; the start values of the unselected
entries are the encoder's values at resume. **DDP**: every sum of the estimation is all-reduced,
so every rank computes the same scores and holds the same masks.

Composes with ``ema_beta`` (the EMA follows the masked net after each step) and ``warmup_steps``
(see :class:`~deft_lightning.tasks.joint.JointFinetune`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from .. import fisher
from .joint import JointFinetune

SCORES = ("random", "fisher", "delta_fisher", "dr_fim")
CACHE_FORMAT = "deft-lightning/fishertune-scores/1"


def _tensor_bytes(tensor: Tensor) -> bytes:
    return str((tensor.dtype, tuple(tensor.shape))).encode() + tensor.detach().cpu().contiguous().reshape(-1).view(
        torch.uint8).numpy().tobytes()


class ScoreCacheError(ValueError):
    """A score cache file that cannot be read or was computed for other weights, data or settings."""


def resolve_shift(name: str) -> Callable[[torch.Generator], Callable[[Tensor], Tensor]]:
    """``"lab_style"``, ``"identity"`` or ``"package.module:factory"`` -> a factory of shifts."""
    if name == "lab_style":
        return fisher.lab_style_shift
    if name == "identity":
        return lambda generator: (lambda images: images)
    module, _, attribute = name.partition(":")
    if not attribute:
        raise ValueError(f"shift must be 'lab_style', 'identity' or 'package.module:factory', got {name!r}")
    return getattr(importlib.import_module(module), attribute)


class FisherTune(JointFinetune):
    """Selective finetuning of the encoder entries with the highest (DR-)Fisher scores.

    Args:
        score: ``"random"``, ``"fisher"``, ``"delta_fisher"`` or ``"dr_fim"``.
        estimator: ``"direct"`` or ``"variational"``.
        fisher_labels: ``"empirical"`` (the labels) or ``"true"`` (drawn from the model;
            direct estimator only).
        fisher_mode: ``"per_sample"`` or ``"micro_batch"`` (with ``micro_batch_size``).
        chunk_size: images per ``vmap`` chunk of the per-sample estimator (memory bound).
        fraction: fraction of encoder entries to finetune (paper: 15.21M of 304M, about 5 %).
        selection: ``"global"`` top-k over the encoder or ``"per_layer"`` per tensor.
        final_fraction, grow_steps: grow the fraction linearly to ``final_fraction`` over
            ``grow_steps`` steps after the masks are built (``None``: fixed fraction).
        estimation_batches: source batches (per rank) used for the scores.
        estimation_seed: seed of the shift, the true-Fisher labels, the variational noise and
            the random scores (the same on every rank).
        shift: the domain shift ``x -> x'`` (see the module docstring).
        delta_epsilon: ``ε`` of ``ΔF`` (and ``ε/γ`` in the variational formula).
        gamma, tau, variational_steps: the variational estimate's γ, prior scale τ and steps.
        score_cache: a safetensors file to load the estimation from or write it to.
        **kwargs: ``ema_beta``, ``warmup_steps`` (:class:`JointFinetune`) and the
            :class:`SegmentationTask` arguments.
    """

    def __init__(
        self,
        *args: Any,
        score: Literal["random", "fisher", "delta_fisher", "dr_fim"] = "dr_fim",
        estimator: Literal["direct", "variational"] = "direct",
        fisher_labels: Literal["empirical", "true"] = "empirical",
        fisher_mode: Literal["per_sample", "micro_batch"] = "per_sample",
        micro_batch_size: int = 1,
        chunk_size: int = 4,
        fraction: float = 0.05,
        selection: Literal["global", "per_layer"] = "global",
        final_fraction: float | None = None,
        grow_steps: int = 0,
        estimation_batches: int = 4,
        estimation_seed: int = 0,
        shift: str = "lab_style",
        delta_epsilon: float = 1e-8,
        gamma: float = 1e-6,
        tau: float = 0.1,
        variational_steps: int = 20,
        score_cache: str | None = None,
        **kwargs: Any,
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {list(SCORES)}, got {score!r}")
        if estimator not in ("direct", "variational"):
            raise ValueError(f"estimator must be 'direct' or 'variational', got {estimator!r}")
        if estimator == "variational" and fisher_labels != "empirical":
            raise ValueError(f"fisher_labels={fisher_labels!r} needs estimator='direct': the variational estimate "
                             "minimises the loss on the batch's labels")
        if selection not in ("global", "per_layer"):
            raise ValueError(f"selection must be 'global' or 'per_layer', got {selection!r}")
        for name, value in (("fraction", fraction), ("final_fraction", final_fraction)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if final_fraction is not None and (final_fraction < fraction or grow_steps <= 0):
            raise ValueError("a growing fraction needs final_fraction >= fraction and grow_steps > 0, "
                             f"got final_fraction={final_fraction}, grow_steps={grow_steps}")
        if estimation_batches < 1:
            raise ValueError(f"estimation_batches must be >= 1, got {estimation_batches}")
        resolve_shift(shift)
        super().__init__(*args, **kwargs)
        self.masks: dict[str, Tensor] | None = None  # encoder parameter name -> bool mask
        self.ranks: dict[str, Tensor] | None = None  # kept only with a growing fraction
        self.kept_fraction: float | None = None
        self._start_values: list[Tensor] | None = None
        self._masked: list[tuple[Tensor, Tensor, Tensor]] = []  # (param, bool mask, float mask)

    # ---- masks in the checkpoint -----------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"masks": self.masks, "ranks": self.ranks, "kept_fraction": self.kept_fraction}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.masks, self.ranks, self.kept_fraction = state["masks"], state["ranks"], state["kept_fraction"]
        self._start_values = None

    # ---- estimation --------------------------------------------------------------------------
    def _reduce(self, tensor: Tensor) -> Tensor:
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return tensor
        return trainer.strategy.reduce(tensor.clone(), reduce_op="sum")

    @property
    def _world_size(self) -> int:
        return 1 if self._trainer is None else self.trainer.world_size

    def estimation_data(self) -> list[tuple[Tensor, Tensor]]:
        """The first ``estimation_batches`` batches of the training set, in order (no shuffle),
        this rank's share under DDP, on the module's device."""
        loader = self.trainer.train_dataloader
        dataset, batch_size = loader.dataset, loader.batch_size
        sampler = None
        if self._world_size > 1:
            sampler = DistributedSampler(dataset, self._world_size, self.trainer.global_rank, shuffle=False)
        batches = []
        with torch.random.fork_rng(devices=[]):
            for batch in DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=True):
                batches.append((batch["image"].to(self.device), batch["mask"].to(self.device)))
                if len(batches) == self.hparams.estimation_batches:
                    break
        if not batches:
            raise ValueError(f"FisherTune: the training set has fewer than batch_size={batch_size} images")
        return batches

    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.hparams.estimation_seed)

    def _encoder_names(self) -> list[str]:
        return [name for name, _ in self.net.encoder.named_parameters()]

    def estimate_ingredients(self, batches: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """``{"x.<name>": F or Λ, "x_shift.<name>": F' or Λ', "eps_mu": ., "eps_sigma": .}``."""
        hp, net = self.hparams, self.net
        names = [f"encoder.{n}" for n in self._encoder_names()]
        shift = resolve_shift(hp.shift)(self._generator())
        shifted = [(shift(images), labels) for images, labels in batches]
        eps_mu, eps_sigma = fisher.feature_shift(fisher.encoder_feature_maps(net), batches, shifted, module=net,
                                                 reduce=self._reduce)
        out: dict[str, Tensor] = {"eps_mu": eps_mu, "eps_sigma": eps_sigma}
        for prefix, data in (("x", batches), ("x_shift", shifted)):
            if hp.estimator == "direct":
                values = fisher.diagonal_fisher(net, data, names, labels=hp.fisher_labels, estimator=hp.fisher_mode,
                                                micro_batch_size=hp.micro_batch_size, chunk_size=hp.chunk_size,
                                                generator=self._generator(), reduce=self._reduce)
            else:
                with fisher.eval_mode(net):
                    values = fisher.variational_precision(
                        fisher.segmentation_loss(net), {n: p.detach() for n, p in net.named_parameters() if n in names},
                        data, gamma=hp.gamma, tau=hp.tau, steps=hp.variational_steps, generator=self._generator(),
                        reduce=self._reduce, world_size=self._world_size)
            out.update({f"{prefix}.{n[len('encoder.'):]}": v for n, v in values.items()})
        return out

    def scores(self, ingredients: dict[str, Tensor]) -> dict[str, Tensor]:
        """The selection scores from the estimated ingredients, by ``score``."""
        hp = self.hparams
        eps_mu, eps_sigma = ingredients["eps_mu"], ingredients["eps_sigma"]
        out = {}
        for name in self._encoder_names():
            x, x_shift = ingredients[f"x.{name}"], ingredients[f"x_shift.{name}"]
            if hp.estimator == "variational":
                if hp.score == "dr_fim":
                    out[name] = fisher.variational_dr_fim(x, x_shift, eps_mu, eps_sigma, hp.gamma, hp.tau, hp.delta_epsilon)
                    continue
                x, x_shift = (fisher.variational_fisher(v, hp.gamma, hp.tau) for v in (x, x_shift))
            if hp.score == "fisher":
                out[name] = x
            elif hp.score == "delta_fisher":
                out[name] = fisher.delta_fisher(x, x_shift, hp.delta_epsilon)
            else:
                out[name] = fisher.dr_fim(x, x_shift, eps_mu, eps_sigma, hp.delta_epsilon)
        return out

    def random_scores(self) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(self.hparams.estimation_seed)
        return {name: torch.rand(p.shape, generator=generator).to(self.device)
                for name, p in self.net.encoder.named_parameters()}

    # ---- the cache ---------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        keys = ("estimator", "fisher_labels", "fisher_mode", "micro_batch_size", "estimation_batches",
                "estimation_seed", "shift")
        settings = {k: self.hparams[k] for k in keys}
        if self.hparams.estimator == "variational":
            settings.update(gamma=self.hparams.gamma, tau=self.hparams.tau, steps=self.hparams.variational_steps)
        settings["world_size"] = self._world_size
        return settings

    def cache_key(self, batches: list[tuple[Tensor, Tensor]]) -> str:
        """SHA-256 of the settings, the net's weights and buffers, and the estimation batches (all ranks)."""
        digest = hashlib.sha256(json.dumps(self._settings(), sort_keys=True).encode())
        for name, tensor in self.net.state_dict().items():
            digest.update(name.encode())
            digest.update(_tensor_bytes(tensor))
        data = hashlib.sha256()
        for images, labels in batches:
            data.update(_tensor_bytes(images))
            data.update(_tensor_bytes(labels))
        data_digest = torch.tensor(list(data.digest()), dtype=torch.float64, device=self.device)
        if self._world_size > 1:
            data_digest = self.trainer.strategy.all_gather(data_digest).flatten()
        digest.update(bytes(int(v) for v in data_digest.tolist()))
        return digest.hexdigest()

    def _read_cache(self, path: Path, key: str) -> dict[str, Tensor] | None:
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                if metadata.get("format") != CACHE_FORMAT:
                    raise ScoreCacheError(f"score cache {path} is not a FisherTune score file "
                                          f"(format {metadata.get('format')!r}, expected {CACHE_FORMAT!r})")
                if metadata.get("key") != key:
                    raise ScoreCacheError(
                        f"score cache {path} was computed for other weights, data or settings (its settings: "
                        f"{metadata.get('settings')}; now: {json.dumps(self._settings(), sort_keys=True)}): "
                        "delete it or set model.score_cache to another file")
                return {k: file.get_tensor(k).to(self.device) for k in file.keys()}
        except ScoreCacheError:
            raise
        except Exception as error:  # not a safetensors file, truncated, unreadable
            raise ScoreCacheError(f"score cache {path} cannot be read: {error}") from error

    def _write_cache(self, path: Path, key: str, ingredients: dict[str, Tensor]) -> None:
        if self._trainer is not None and not self.trainer.is_global_zero:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        save_file({k: v.detach().cpu().contiguous() for k, v in ingredients.items()}, str(partial),
                  metadata={"format": CACHE_FORMAT, "key": key, "settings": json.dumps(self._settings(), sort_keys=True)})
        os.replace(partial, path)

    # ---- masks ----------------------------------------------------------------------------
    def build_masks(self) -> None:
        """Estimate (or load) the scores and select the entries; sets ``masks``."""
        hp = self.hparams
        if hp.score == "random":
            scores = self.random_scores()
        else:
            batches = self.estimation_data()
            path = Path(hp.score_cache) if hp.score_cache else None
            key = self.cache_key(batches) if path else ""
            ingredients = self._read_cache(path, key) if path else None
            if ingredients is None:
                ingredients = self.estimate_ingredients(batches)
                if path:
                    self._write_cache(path, key, ingredients)
            else:
                rank_zero_info(f"FisherTune: scores loaded from {path}")
            scores = self.scores(ingredients)
        ranks = fisher.entry_ranks(scores, hp.selection)
        self.ranks = ranks if hp.final_fraction is not None else None
        self.kept_fraction = hp.fraction
        self.masks = fisher.masks_from_ranks(ranks, hp.fraction, hp.selection)
        kept = sum(int(m.sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        rank_zero_info(f"FisherTune: {kept:,} of {total:,} encoder entries selected ({hp.score}, {hp.estimator}, "
                       f"{hp.selection}, fraction {hp.fraction})")

    def fraction_at(self, step: int) -> float:
        hp = self.hparams
        if hp.final_fraction is None:
            return hp.fraction
        progress = min(1.0, max(0, step - hp.warmup_steps) / hp.grow_steps)
        return hp.fraction + (hp.final_fraction - hp.fraction) * progress

    def _grow(self, fraction: float) -> None:
        masks = fisher.masks_from_ranks(self.ranks, fraction, self.hparams.selection)
        optimizer = self.trainer.optimizers[0] if self._trainer is not None and self.trainer.optimizers else None
        params = dict(self.net.encoder.named_parameters())
        for name, mask in masks.items():
            added = mask & ~self.masks[name]
            if optimizer is not None and added.any():
                for value in optimizer.state.get(params[name], {}).values():
                    if torch.is_tensor(value) and value.shape == mask.shape:
                        value.masked_fill_(added, 0)
        self.masks, self.kept_fraction = masks, fraction
        self._start_values = None

    def _prepare_masked_update(self) -> None:
        """Start values of the encoder and float masks, from the masks and the current encoder."""
        params = dict(self.net.encoder.named_parameters())
        self._masked = [(params[n], m.to(params[n].device), m.to(params[n].device, params[n].dtype))
                        for n, m in self.masks.items()]
        self._start_values = [p.detach().clone() for p, _, _ in self._masked]

    # ---- training hooks ------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step < self.hparams.warmup_steps:
            return
        if self.masks is None:
            self.build_masks()
        fraction = self.fraction_at(self.global_step)
        if self.ranks is not None and fraction != self.kept_fraction:
            self._grow(fraction)
        if self._start_values is None:
            self._prepare_masked_update()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [(p.grad, mask) for p, _, mask in self._masked if p.grad is not None]
        if grads and self._start_values is not None:
            torch._foreach_mul_([g for g, _ in grads], [m for _, m in grads])

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self._start_values is not None:
            self.restore_unselected()

    @torch.no_grad()
    def restore_unselected(self) -> None:
        """Every unselected encoder entry back to its start value, bit for bit."""
        for (param, mask, _), start in zip(self._masked, self._start_values):
            param.copy_(torch.where(mask, param, start))
