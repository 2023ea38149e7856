"""Layer-wise checkpoint merging (Alcover-Couso et al., "Layer-wise Model Merging for
Unsupervised Domain Adaptation in Segmentation Tasks"), a model soup, and WiSE-FT.

Pure functions over ``SegmentationNet`` state dicts; no training, no Lightning (a task
checkpoint's class is imported only to find its inference net).

**Depth.** A *layer* is a module that holds tensors (a conv's weight and bias, a BN layer's
affine parameters and running statistics share one depth), in the anchor's registration
order: encoder, then decoder, then segmentation head. Layer ``l`` of ``L`` has depth
``t = l / (L − 1)``. The input-normalisation buffers on the net itself (``input_mean``,
``input_std``) are no layer: they come from the anchor and must be equal in every input.
A ``.safetensors`` file keeps its tensors sorted by name, not in registration order: with one
as the anchor, the layer-wise merge needs the net's arguments (``net``) to order its tensors.

**Weights (our reading; the paper gives no formula).** With ``K`` models and anchor ``a``::

    w_a(t) = 1/K + (anchor_max − 1/K) · t^p,        w_k(t) = (1 − w_a(t)) / (K − 1)  (k ≠ a)

so the first layer is a uniform average and the last leans toward the anchor (fully, with
the default ``anchor_max = 1``). ``mode="uniform"`` is a model soup: ``1/K`` at every depth.
``mode="wise"`` is WiSE-FT (Wortsman et al. 2022) for one finetuned model:
``θ_enc = (1 − α) θ_pretrained + α θ_finetuned``, the decoder from the finetuned model.

**Buffers.** BN running means merge with their layer's weights; running variances by moment
matching, so the merged BN normalises with the variance of the weighted mixture of the
inputs' feature distributions, ``σ² = Σ_k w_k (σ²_k + μ_k²) − μ²`` with ``μ = Σ_k w_k μ_k``.
Integer buffers (``num_batches_tracked``) come from the anchor.

**Shared encoder.** ``parts="encoder"`` merges only the ``encoder.*`` tensors, which must
match across inputs; everything else comes from the anchor (the paper's merge of different
architectures with a shared backbone). Depth is still counted over the anchor's whole net.

**Streaming.** Inputs given as paths are loaded one at a time (``torch.load(mmap=True,
weights_only=True)`` or safetensors) and folded into a running weighted mean (and, for BN
variances, the pairwise mixture update of Chan et al.), so peak memory is about two models
whatever ``K``. The running update also keeps ``K`` identical inputs exactly identical.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file as load_safetensors
from torch import Tensor

from .net import SegmentationNet
from .safe_load import load_checkpoint, task_class_named
from .weights import IMAGENET_MEAN, IMAGENET_STD

StateDict = Mapping[str, Tensor]
Source = StateDict | str | os.PathLike
Mode = Literal["layerwise", "uniform", "wise"]
Parts = Literal["all", "encoder"]

MODES = ("layerwise", "uniform", "wise")
PARTS = ("all", "encoder")
ENCODER_PREFIX = "encoder."
#: ``SegmentationNet`` arguments kept as a merge input's net config.
NET_ARGUMENTS = ("arch", "encoder_name", "encoder_weights", "num_classes", "arch_kwargs")
#: smp model prefixes (``save_pretrained`` folders) -> ``SegmentationNet`` prefixes.
SMP_PREFIXES = {"encoder.": "encoder.", "decoder.": "decoder.decoder.", "segmentation_head.": "decoder.head."}


class MergeError(ValueError):
    """Inputs that cannot be merged: unreadable, or of a different architecture than the anchor."""


@dataclass
class NetState:
    """One merge input: a ``SegmentationNet`` state dict, where it came from, and its net
    arguments (``arch``, ``encoder_name``, ``encoder_weights``, ... ; ``None`` when a bare state
    dict does not say)."""

    name: str
    state: dict[str, Tensor]
    config: dict[str, Any] | None = None
    ordered: bool = True  # keys in the net's registration order (not so in a safetensors file)


# ---- the weights ---------------------------------------------------------------------------
def anchor_weight(t: float, num_models: int, power: float = 1.0, anchor_max: float = 1.0) -> float:
    """``w_a(t) = 1/K + (anchor_max − 1/K) · t^p``: the anchor's weight at depth ``t``."""
    uniform = 1.0 / num_models
    return uniform + (anchor_max - uniform) * t**power


def layer_of(key: str) -> str:
    """The module a state-dict key belongs to (``""`` for tensors on the net itself)."""
    return key.rpartition(".")[0]


def layer_depths(keys: Sequence[str]) -> dict[str, float]:
    """Depth ``t = l / (L − 1)`` of every layer (module holding tensors), in key order.

    Tensors on the root module (the input normalisation) are no layer and get no depth.
    """
    layers = list(dict.fromkeys(layer_of(key) for key in keys if layer_of(key)))
    last = max(len(layers) - 1, 1)
    return {layer: index / last for index, layer in enumerate(layers)}


def _is_merged(tensor: Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


# ---- the running weighted mean --------------------------------------------------------------
class _RunningMerge:
    """Folds inputs one at a time into ``Σ_k w_k θ_k / Σ_k w_k`` per tensor.

    ``m ← m + (w / W)(θ − m)`` with ``W`` the weight seen so far; a BN running variance folds
    with its mean as the mixture of two groups (fractions ``1 − b`` and ``b = w / W``):
    ``v ← v + b (σ² − v) + b (1 − b)(μ − m)²``. Identical inputs leave ``m`` and ``v`` exactly
    unchanged, and the accumulator is one model in the inputs' dtype (float32 at least).
    """

    def __init__(self, variance_of: dict[str, str]) -> None:
        self.variance_of = variance_of  # running_mean key -> running_var key
        self.variances = set(variance_of.values())
        self.values: dict[str, Tensor] = {}
        self.totals: dict[str, float] = {}

    def add(self, state: StateDict, weights: Mapping[str, float]) -> None:
        for key, weight in weights.items():
            if weight == 0 or key in self.variances:  # variances move with their means
                continue
            total = self.totals.get(key, 0.0) + weight
            share = weight / total
            self.totals[key] = total
            value = state[key]
            dtype = torch.promote_types(value.dtype, torch.float32)
            variance_key = self.variance_of.get(key)
            if key not in self.values:
                self.values[key] = value.to(dtype, copy=True)
                if variance_key:
                    self.values[variance_key] = state[variance_key].to(dtype, copy=True)
                continue
            mean = self.values[key]
            delta = value.to(dtype) - mean
            if variance_key:
                variance = self.values[variance_key]
                variance.add_(state[variance_key].to(dtype) - variance, alpha=share)
                variance.add_(delta * delta, alpha=share * (1.0 - share))
            mean.add_(delta, alpha=share)


# ---- the merge ------------------------------------------------------------------------------
def merge_layerwise(
    inputs: Sequence[Source],
    anchor: int = 0,
    power: float = 1.0,
    anchor_max: float = 1.0,
    mode: Mode = "layerwise",
    parts: Parts = "all",
    alpha: float = 0.5,
    pretrained: str | None = None,
    net: Mapping[str, Any] | None = None,
) -> dict[str, Tensor]:
    """Merge ``SegmentationNet`` weights; returns the merged state dict (anchor's key order).

    Args:
        inputs: state dicts, or paths :func:`load_net_state` reads (task checkpoints, state-dict
            files, exported smp folders); paths are loaded one at a time.
        anchor: index of the anchor in ``inputs`` (its architecture, key order, integer
            buffers, and everything outside the merged parts).
        power: ``p`` of the layer-wise weights.
        anchor_max: the anchor's weight at the last layer, in ``[1/K, 1]``.
        mode: ``"layerwise"`` (the paper), ``"uniform"`` (model soup) or ``"wise"`` (WiSE-FT:
            exactly one input, interpolated toward its pretrained encoder with ``alpha``).
        parts: ``"all"`` or ``"encoder"`` (shared-encoder merge of different decoders).
        alpha: WiSE-FT's weight of the finetuned encoder.
        pretrained: WiSE-FT's pretrained encoder weights (``"imagenet-offline"`` or a local
            file, as ``encoder_weights``); default: the finetuned run's own ``encoder_weights``.
        net: the anchor's ``SegmentationNet`` arguments; its tensors are taken in the order of
            that net (needed for a layer-wise merge with a ``.safetensors`` anchor).
    """
    return merge_inputs(inputs, anchor, power, anchor_max, mode, parts, alpha, pretrained, net)[0]


def merge_inputs(
    inputs: Sequence[Source],
    anchor: int = 0,
    power: float = 1.0,
    anchor_max: float = 1.0,
    mode: Mode = "layerwise",
    parts: Parts = "all",
    alpha: float = 0.5,
    pretrained: str | None = None,
    net: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Tensor], NetState]:
    """:func:`merge_layerwise`, also returning the anchor (its tensors dropped: name, config)."""
    num_models = len(inputs)
    _check_arguments(num_models, anchor, power, anchor_max, mode, parts, alpha)
    anchor_state = load_net_state(inputs[anchor], f"input {anchor}")
    if net is not None:
        anchor_state.state = _in_registration_order(anchor_state, net)
    elif not anchor_state.ordered and mode == "layerwise":
        raise MergeError(f"the anchor {anchor_state.name} is a safetensors file, which does not keep the net's "
                         f"registration order that layer-wise depth needs: pass the net's arguments (net=, --net)")
    keys = list(anchor_state.state)
    whole_net = mode != "wise" and parts == "all"
    merged_keys = [key for key in keys if layer_of(key) and _is_merged(anchor_state.state[key])
                   and (whole_net or key.startswith(ENCODER_PREFIX))]
    depths = layer_depths(keys)
    variance_of = {key: f"{key[:-len('mean')]}var" for key in merged_keys
                   if key.endswith(".running_mean") and f"{key[:-len('mean')]}var" in anchor_state.state}
    accumulator = _RunningMerge(variance_of)
    anchor_only = {key: 1.0 for key in keys if key not in merged_keys and _is_merged(anchor_state.state[key])}

    def weights_of(index: int) -> dict[str, float]:
        is_anchor = index == anchor
        if mode == "uniform":
            merged = {key: 1.0 / num_models for key in merged_keys}
        elif mode == "wise":  # index 0: the finetuned model, 1: its pretrained encoder
            merged = {key: alpha if is_anchor else 1.0 - alpha for key in merged_keys}
        else:
            merged = {}
            for key in merged_keys:
                weight = anchor_weight(depths[layer_of(key)], num_models, power, anchor_max)
                merged[key] = weight if is_anchor else (1.0 - weight) / (num_models - 1)
        return {**merged, **(anchor_only if is_anchor else {})}

    accumulator.add(anchor_state.state, weights_of(anchor))
    reference = _Reference(anchor_state, keys if whole_net else merged_keys, whole_net)
    anchor_state.state = {}  # the accumulator holds what is needed; free the input
    for index, other in _other_inputs(inputs, anchor, mode, pretrained, anchor_state):
        reference.check(other)
        accumulator.add(other.state, weights_of(index))
        other.state = {}
    merged = {key: reference.integers[key] if key in reference.integers
              else accumulator.values[key].to(reference.dtypes[key]) for key in keys}
    return merged, anchor_state


def _reference_state(config: Mapping[str, Any]) -> dict[str, Tensor]:
    """The state dict (meta tensors, registration order) of the ``SegmentationNet`` ``config`` builds."""
    with torch.device("meta"):
        return SegmentationNet(**{**config, "encoder_weights": None}).state_dict()


def _in_registration_order(loaded: NetState, config: Mapping[str, Any]) -> dict[str, Tensor]:
    """``loaded``'s tensors in the order of the net ``config`` builds; its keys must be that net's."""
    reference = _reference_state(config)
    problem = next((key for key in [*reference, *loaded.state] if (key in reference) != (key in loaded.state)), None)
    if problem is not None:
        where = "missing in the anchor" if problem in reference else "not in that net"
        raise MergeError(f"the anchor {loaded.name} does not fit the net arguments {dict(config)}: "
                         f"first differing key {problem!r} ({where})")
    return {key: loaded.state[key] for key in reference}


def _check_arguments(num_models: int, anchor: int, power: float, anchor_max: float, mode: str,
                     parts: str, alpha: float) -> None:
    if num_models == 0:
        raise MergeError("nothing to merge: no inputs")
    if mode not in MODES:
        raise MergeError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if parts not in PARTS:
        raise MergeError(f"parts must be one of {list(PARTS)}, got {parts!r}")
    if not 0 <= anchor < num_models:
        raise MergeError(f"anchor must index one of the {num_models} inputs, got {anchor}")
    if power <= 0:
        raise MergeError(f"power must be > 0, got {power}")
    if not 1.0 / num_models - 1e-12 <= anchor_max <= 1.0:
        raise MergeError(f"anchor_max must be in [1/K, 1] = [{1.0 / num_models:.4g}, 1] for K = {num_models} "
                         f"inputs, got {anchor_max}")
    if mode == "wise" and num_models != 1:
        raise MergeError(f"mode 'wise' interpolates one finetuned model toward its pretrained encoder; "
                         f"got {num_models} inputs")
    if mode == "wise" and not 0.0 <= alpha <= 1.0:
        raise MergeError(f"alpha must be in [0, 1], got {alpha}")


def _other_inputs(inputs: Sequence[Source], anchor: int, mode: str, pretrained: str | None,
                  anchor_state: NetState) -> Iterator[tuple[int, NetState]]:
    """The inputs after the anchor, loaded one at a time (WiSE-FT: the pretrained encoder)."""
    if mode == "wise":
        yield 1, pretrained_encoder(anchor_state, pretrained)
        return
    for index, source in enumerate(inputs):
        if index != anchor:
            yield index, load_net_state(source, f"input {index}")


def pretrained_encoder(finetuned: NetState, pretrained: str | None) -> NetState:
    """The encoder a finetuned net started from (``encoder.*`` keys only), built with
    ``SegmentationNet``'s own offline loading."""
    config = finetuned.config
    if config is None:
        raise MergeError(f"{finetuned.name} does not record its net arguments: WiSE-FT needs a task checkpoint "
                         f"or an exported folder")
    weights = pretrained if pretrained is not None else config.get("encoder_weights")
    if weights is None:
        raise MergeError(f"{finetuned.name} was trained from a randomly initialised encoder (encoder_weights=None): "
                         f"pass the pretrained encoder weights (pretrained=, --pretrained)")
    net = SegmentationNet(**{**config, "encoder_weights": weights})
    state = {f"{ENCODER_PREFIX}{key}": value for key, value in net.encoder.state_dict().items()}
    return NetState(f"pretrained encoder {weights}", state, config)


class _Reference:
    """What every other input must match: the anchor's keys and shapes (``compared``, plus no
    extra keys when the whole net merges) and its input normalisation."""

    def __init__(self, anchor: NetState, compared: list[str], whole_net: bool) -> None:
        self.name, self.compared, self.whole_net = anchor.name, compared, whole_net
        self.shapes = {key: tuple(value.shape) for key, value in anchor.state.items()}
        self.dtypes = {key: value.dtype for key, value in anchor.state.items()}
        self.integers = {key: value.clone() for key, value in anchor.state.items() if not _is_merged(value)}
        self.normalization = {key: value.clone() for key, value in anchor.state.items() if not layer_of(key)}

    def check(self, other: NetState) -> None:
        """Raise a ``MergeError`` naming ``other`` and its first key that differs from the anchor."""
        problem = self._first_difference(other.state)
        if problem is not None:
            hint = ""
            if self.whole_net and self._encoders_match(other.state):
                hint = "; their encoders match: merge the encoders only with parts='encoder' (--parts encoder)"
            raise MergeError(f"{other.name} does not match the anchor {self.name}: first differing key {problem}{hint}")
        for key, value in self.normalization.items():
            if key in other.state and not torch.equal(other.state[key], value):
                raise MergeError(f"{other.name} expects a different input normalisation ({key}) than the anchor "
                                 f"{self.name}: their encoders were trained from different weights")

    def _first_difference(self, state: StateDict) -> str | None:
        for key in self.compared:
            if key not in state:
                return f"{key!r}: in the anchor, missing here"
            if tuple(state[key].shape) != self.shapes[key]:
                return f"{key!r}: shape {tuple(state[key].shape)} here, {self.shapes[key]} in the anchor"
        extra = [key for key in state if key not in self.shapes] if self.whole_net else []
        return f"{extra[0]!r}: not in the anchor" if extra else None

    def _encoders_match(self, state: StateDict) -> bool:
        ours = {key: shape for key, shape in self.shapes.items() if key.startswith(ENCODER_PREFIX)}
        theirs = {key: tuple(value.shape) for key, value in state.items() if key.startswith(ENCODER_PREFIX)}
        return bool(ours) and theirs == ours


# ---- reading inputs -------------------------------------------------------------------------
def load_net_state(source: Source, name: str | None = None) -> NetState:
    """A ``SegmentationNet`` state dict from any merge input.

    ``source`` is a state dict, a task checkpoint (``.ckpt`` of any deft-lightning task: its
    ``inference_net()``, e.g. the EMA net or DeFT's final pair), a state-dict file
    (``torch.save`` or ``.safetensors``) or an exported smp folder (``deft-lightning export``
    or ``save_pretrained``). Files are read safely (``weights_only=True``) and memory-mapped.
    """
    if isinstance(source, Mapping):
        loaded = NetState(name or "state dict", dict(source))
    else:
        path = Path(source)
        if path.is_dir():
            loaded = _exported_folder(path)
        elif path.is_file():
            loaded = _state_file(path)
        else:
            raise MergeError(f"merge input {path} does not exist")
    _check_state(loaded)
    return loaded


def _state_file(path: Path) -> NetState:
    if path.suffix == ".safetensors":
        return NetState(str(path), load_safetensors(path, device="cpu"), ordered=False)
    content = load_checkpoint(path, mmap=True)
    if "task_class" in content:
        return _task_checkpoint(path, content)
    if "state_dict" in content:
        raise MergeError(f"{path} is a Lightning checkpoint without a 'task_class' entry: not written by a "
                         f"deft-lightning task")
    return NetState(str(path), dict(content))


def _task_checkpoint(path: Path, checkpoint: Mapping[str, Any]) -> NetState:
    """The task's ``inference_net()`` weights: the task is built on the meta device (no memory,
    no init) and takes the checkpoint's (memory-mapped) tensors as they are."""
    hparams = {key: value for key, value in checkpoint.get("hyper_parameters", {}).items()
               if not key.startswith("_")}
    with torch.device("meta"):
        task = task_class_named(checkpoint["task_class"], path)(**{**hparams, "encoder_weights": None})
    task.load_state_dict(checkpoint["state_dict"], assign=True)
    state = dict(task.inference_net().state_dict())
    config = {key: hparams[key] for key in NET_ARGUMENTS if key in hparams}
    return NetState(str(path), state, config)


def _exported_folder(path: Path) -> NetState:
    """An smp ``save_pretrained`` folder, keys renamed to ``SegmentationNet``'s; input
    normalisation from ``preprocessing.json`` (else ImageNet's, like ``SegmentationNet``)."""
    config_file, weights_file = path / "config.json", path / "model.safetensors"
    if not (config_file.is_file() and weights_file.is_file()):
        raise MergeError(f"{path} is a folder but not an exported model (config.json + model.safetensors)")
    smp_config = json.loads(config_file.read_text())
    smp_config.pop("encoder_weights", None)
    config = {"arch": smp_config.pop("_model_class"), "encoder_name": smp_config.pop("encoder_name"),
              "encoder_weights": None, "num_classes": smp_config.pop("classes"), "arch_kwargs": smp_config}
    reference = _reference_state(config)
    smp_state = load_safetensors(weights_file, device="cpu")
    state: dict[str, Tensor] = {}
    for smp_key, value in smp_state.items():
        prefix = next((p for p in SMP_PREFIXES if smp_key.startswith(p)), None)
        key = SMP_PREFIXES[prefix] + smp_key[len(prefix):] if prefix else smp_key
        if key in reference:  # smp keeps encoder stages a shallower net never runs
            state[key] = value
    preprocessing_file = path / "preprocessing.json"
    preprocessing = json.loads(preprocessing_file.read_text()) if preprocessing_file.is_file() else {}
    state["input_mean"] = torch.tensor(preprocessing.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1)
    state["input_std"] = torch.tensor(preprocessing.get("std", IMAGENET_STD)).view(1, 3, 1, 1)
    missing = [key for key in reference if key not in state]
    if missing:
        raise MergeError(f"{path} does not fit its own config.json: first missing key {missing[0]!r}")
    return NetState(str(path), {key: state[key] for key in reference}, config)


def _check_state(loaded: NetState) -> None:
    if not loaded.state or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in loaded.state.items()):
        raise MergeError(f"{loaded.name} does not hold a state dict (names -> tensors)")
