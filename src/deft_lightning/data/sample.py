"""The one sample format every dataset in the library yields.

A sample is a dict: ``image`` float32 tensor (3, H, W) with values in [0, 1] (RGB, not
normalised: the network records and applies its own input normalisation), ``mask`` int64
tensor (H, W) of train ids 0..18 with 255 = ignore, ``domain`` (str), ``name`` (str).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .labels import IGNORE_INDEX, NUM_CLASSES

Transform = Callable[..., dict]


def check_mask_ids(mask: np.ndarray, source: str) -> None:
    """Raise ``ValueError`` naming ``source`` if ``mask`` holds ids outside 0..18 and 255."""
    ids = np.unique(mask)
    bad = ids[(ids >= NUM_CLASSES) & (ids != IGNORE_INDEX)]
    if bad.size:
        raise ValueError(
            f"{source}: mask holds ids {bad[:10].tolist()} outside the train ids "
            f"0..{NUM_CLASSES - 1} and {IGNORE_INDEX} (ignore); map the dataset's ids to train ids first"
        )


def make_sample(
    image: np.ndarray,
    mask: np.ndarray | None,
    domain: str,
    name: str,
    transform: Transform | None = None,
    **transform_args,
) -> dict:
    """Apply an albumentations ``transform`` to uint8 ``image`` (H, W, 3) and ``mask`` (H, W),
    then convert to the sample dict. ``mask=None`` (predict on unlabelled images) yields an
    all-ignore mask so batches keep one shape. ``transform_args`` are extra named inputs of the
    transform (``crop_class`` for :class:`~deft_lightning.data.transforms.ClassCentredCrop`)."""
    if mask is None:
        mask = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
    if transform is not None:
        out = transform(image=image, mask=mask, **transform_args)
        image, mask = out["image"], out["mask"]
    image_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mask_t = torch.from_numpy(np.ascontiguousarray(mask)).long()
    return {"image": image_t, "mask": mask_t, "domain": domain, "name": name}
