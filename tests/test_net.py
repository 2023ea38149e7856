import pytest
import torch

from deft_lightning import SegmentationNet


@pytest.mark.parametrize(
    "arch, encoder, kwargs",
    [
        ("Unet", "resnet18", {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}),
        ("FPN", "mobilenet_v2", {}),
        ("DeepLabV3Plus", "resnet18", {"encoder_output_stride": 16, "decoder_atrous_rates": [6, 12, 18]}),
    ],
)
def test_any_smp_arch_splits_into_encoder_and_decoder(arch, encoder, kwargs):
    net = SegmentationNet(arch, encoder, None, 19, kwargs).eval()
    images = torch.rand(2, 3, 64, 96)
    logits = net(images)
    assert logits.shape == (2, 19, 64, 96)
    # decoder maps the encoder's feature list to logits at the input size
    torch.testing.assert_close(net.decoder(net.encoder(net.normalize(images))), logits)
    # the same function as smp's own model holding the same weights
    torch.testing.assert_close(net.to_smp().eval()(net.normalize(images)), logits)


@pytest.mark.parametrize("arch, kwargs, pads", [("Unet", {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}, None),
                                               ("FPN", {}, 32)])
def test_any_input_size_gives_logits_at_that_size(arch, kwargs, pads):
    """smp runs a Unet at any size; other architectures are padded to stride multiples."""
    net = SegmentationNet(arch, "resnet18", None, 19, kwargs).eval()
    assert net.pad_to_multiple_of == pads
    logits = net(torch.rand(1, 3, 45, 70))
    assert logits.shape == (1, 19, 45, 70)


def test_input_normalisation_is_recorded_in_the_state_dict():
    net = SegmentationNet("Unet", "resnet18", None, 19, {"encoder_depth": 3, "decoder_channels": [32, 16, 8]})
    state = net.state_dict()
    torch.testing.assert_close(state["input_mean"].flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(state["input_std"].flatten(), torch.tensor([0.229, 0.224, 0.225]))


def test_with_parts_shares_modules_without_copying():
    kwargs = {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}
    a = SegmentationNet("Unet", "resnet18", None, 19, kwargs).eval()
    b = SegmentationNet("Unet", "resnet18", None, 19, kwargs).eval()
    mixed = a.with_parts(a.encoder, b.decoder)
    assert mixed.encoder is a.encoder and mixed.decoder is b.decoder
    assert a.decoder is not b.decoder  # the source net is untouched
    images = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(mixed(images), b.decoder(a.encoder(a.normalize(images))))


def test_shallow_encoder_has_no_parameters_without_gradient():
    """smp keeps unused stages for encoder_depth < 5; DDP would reject their missing grads."""
    net = SegmentationNet("Unet", "resnet18", None, 19, {"encoder_depth": 3, "decoder_channels": [32, 16, 8]})
    net(torch.rand(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
