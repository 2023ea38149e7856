"""The 19 Cityscapes train classes, their palette, and the dataset id maps to train ids.

Every dataset in this library yields masks in train ids 0..18, with 255 for "ignore".
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255
NUM_CLASSES = 19

CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)


def class_names(count: int) -> list[str]:
    """Names of a net's ``count`` output classes: :data:`CLASSES`, then ``"class <i>"`` for the
    outputs beyond them (a net built with ``num_classes`` > 19)."""
    return [*CLASSES[:count], *(f"class {index}" for index in range(len(CLASSES), count))]


PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
        (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    dtype=np.uint8,
)


def lookup_table(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """A uint8 table sending every id in ``mapping`` to its train id and all others to 255."""
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for source_id, train_id in mapping.items():
        table[source_id] = train_id
    return table


# Cityscapes (and GTAV, ACDC) label ids -> train ids.
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

# Mapillary Vistas v1.2 (66 classes) ids -> train ids.
MAPILLARY_ID_TO_TRAIN_ID = {
    13: 0, 24: 0, 41: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6, 50: 7,
    30: 8, 29: 9, 27: 10, 19: 11, 20: 12, 21: 12, 22: 12, 55: 13, 61: 14, 54: 15,
    58: 16, 57: 17, 52: 18,
}

# SYNTHIA RAND-CITYSCAPES class ids (channel 0 of the 16-bit GT) -> train ids.
SYNTHIA_ID_TO_TRAIN_ID = {
    1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18, 12: 17,
    15: 6, 16: 9, 17: 12, 18: 14, 19: 15, 20: 16, 21: 3,
}


def colorize(mask: np.ndarray) -> np.ndarray:
    """An HxWx3 uint8 colour image of a train-id mask (ignore drawn black)."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:NUM_CLASSES] = PALETTE
    return table[mask]
