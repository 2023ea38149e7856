"""Tiny fake copies of the real datasets' folder layouts, for tests that run the readers, the
data presets and the command line on them (importable from any test: ``from fake_datasets import
make_data_root``).

Each ``make_<dataset>(root)`` writes a few small street-like images (sky, buildings, road and a
car block, in a colour of its own) and their labels in the dataset's own ids and file format:
Cityscapes label ids (grey PNG: Cityscapes, ACDC; palette PNG: GTAV), train ids (BDD100K,
``folder``), Vistas ids (palette PNG: Mapillary), SYNTHIA ids (16-bit RGB PNG, class in R).
:func:`make_data_root` lays them all out under one folder, at the relative roots the presets in
configs/data/ name.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

#: Image size of the fake datasets (height, width): small, and not a multiple of 32.
SIZE = (48, 80)
#: Images per split.
COUNT = 4

# Train-id scene: sky 10, building 2, road 0, car 13 (a block whose place varies per image).
SKY, BUILDING, ROAD, CAR = 10, 2, 0, 13
#: train id -> the id each dataset stores for it.
CITYSCAPES_IDS = {SKY: 23, BUILDING: 11, ROAD: 7, CAR: 26}
VISTAS_IDS = {SKY: 27, BUILDING: 17, ROAD: 13, CAR: 55}
SYNTHIA_IDS = {SKY: 1, BUILDING: 2, ROAD: 3, CAR: 8}


def write_image(path: Path, height: int = SIZE[0], width: int = SIZE[1], rgb=(200, 100, 50)) -> Path:
    """A uniform colour image, written with OpenCV (so given in BGR order); JPEG by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.zeros((height, width, 3), np.uint8)
    image[:] = rgb[::-1]
    assert cv2.imwrite(str(path), image)
    return path


def write_rgb(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1]))
    return path


def write_grey_label(path: Path, ids: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), ids.astype(np.uint8))
    return path


def write_palette_label(path: Path, ids: np.ndarray) -> Path:
    """A palette PNG whose indices are the ids (as GTAV and Mapillary ship their labels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    label = Image.fromarray(ids.astype(np.uint8), mode="P")
    label.putpalette([(7 * i) % 256 for i in range(768)])
    label.save(path)
    return path


def write_png16_rgb(path: Path, rgb: np.ndarray) -> Path:
    """A 16-bit RGB PNG written byte by byte, so channel 0 is R in the file beyond doubt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def scene(index: int, tint: int, size: tuple[int, int] = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 street scene and its train ids; ``tint`` shifts the colours (the domain)."""
    height, width = size
    ids = np.full((height, width), ROAD, np.uint8)
    ids[: height // 3] = SKY
    ids[height // 3 : height // 2] = BUILDING
    left = (index * 13) % (width // 2)
    ids[height // 2 : 3 * height // 4, left : left + width // 4] = CAR
    palette = {SKY: (90, 150, 230), BUILDING: (120, 110, 100), ROAD: (70, 70, 80), CAR: (200, 30, 30)}
    image = np.zeros((height, width, 3), np.int32)
    for train_id, colour in palette.items():
        image[ids == train_id] = colour
    rng = np.random.default_rng(index)
    image = image + tint + rng.integers(-10, 10, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), ids


def to_ids(train_ids: np.ndarray, table: dict[int, int]) -> np.ndarray:
    out = np.zeros_like(train_ids, dtype=np.uint16)
    for train_id, stored in table.items():
        out[train_ids == train_id] = stored
    return out


def make_cityscapes(root: Path, splits=("train", "val"), count: int = COUNT) -> Path:
    for split in splits:
        for i in range(count):
            city = ("aachen", "bochum")[i % 2]
            stem = f"{city}_{i:06d}_000019"
            image, ids = scene(i, 0)
            write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
            write_grey_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                             to_ids(ids, CITYSCAPES_IDS))
    return root


def make_gtav(root: Path, count: int = 2 * COUNT) -> Path:
    """``count`` pairs, the first half listed in train.txt, the rest in val.txt."""
    names = [f"{i + 1:05d}" for i in range(count)]
    for i, name in enumerate(names):
        image, ids = scene(i, 25)
        write_rgb(root / "images" / f"{name}.png", image)
        write_palette_label(root / "labels" / f"{name}.png", to_ids(ids, CITYSCAPES_IDS))
    (root / "train.txt").write_text("\n".join(names[: count // 2]) + "\n")
    (root / "val.txt").write_text("\n".join(f"{n}.png" for n in names[count // 2 :]) + "\n")
    return root


def make_bdd100k(root: Path, splits=("train", "val"), count: int = COUNT, official: bool = True) -> Path:
    for split in splits:
        for i in range(count):
            name = f"{i:08x}-bdd"
            image, ids = scene(i, -20)
            if official:
                write_rgb(root / "images" / "10k" / split / f"{name}.jpg", image)
                write_grey_label(root / "labels" / "sem_seg" / "masks" / split / f"{name}.png", ids)
            else:
                write_rgb(root / "images" / split / f"{name}.jpg", image)
                write_grey_label(root / "labels" / split / f"{name}_train_id.png", ids)
    return root


def make_mapillary(root: Path, splits=("training", "validation"), count: int = COUNT) -> Path:
    for split in splits:
        for i in range(count):
            image, ids = scene(i, 10, (SIZE[0] + 8 * i, SIZE[1]))  # sizes differ, as in Vistas
            write_rgb(root / split / "images" / f"mapillary_{i}.jpg", image)
            write_palette_label(root / split / "labels" / f"mapillary_{i}.png", to_ids(ids, VISTAS_IDS))
    return root


def make_synthia(root: Path, count: int = 2 * COUNT) -> Path:
    names = [f"{i:07d}" for i in range(count)]
    for i, name in enumerate(names):
        image, ids = scene(i, 40)
        write_rgb(root / "RGB" / f"{name}.png", image)
        label = np.zeros((*ids.shape, 3), np.uint16)
        label[..., 0] = to_ids(ids, SYNTHIA_IDS)
        label[..., 1] = i + 1  # instance ids, ignored
        write_png16_rgb(root / "GT" / "LABELS" / f"{name}.png", label)
    (root / "train.txt").write_text("\n".join(names[: count // 2]) + "\n")
    (root / "val.txt").write_text("\n".join(names[count // 2 :]) + "\n")
    return root


def make_acdc(root: Path, splits=("train", "val"), count: int = 2) -> Path:
    for c, condition in enumerate(("fog", "night", "rain", "snow")):
        for split in splits:
            for i in range(count):
                stem = f"GOPR{c}{i:03d}_frame_{i:06d}"
                image, ids = scene(i, -30 - 10 * c)
                write_rgb(root / "rgb_anon" / condition / split / f"GOPR{c}" / f"{stem}_rgb_anon.png", image)
                write_grey_label(root / "gt" / condition / split / f"GOPR{c}" / f"{stem}_gt_labelIds.png",
                                 to_ids(ids, CITYSCAPES_IDS))
    return root


def make_folder(root: Path, count: int = COUNT, split: str = "") -> Path:
    """``<root>/images/<split>/*.png`` and ``<root>/masks/<split>/*.png`` (train ids)."""
    for i in range(count):
        image, ids = scene(i, 15)
        write_rgb(root / "images" / split / f"street_{i}.png", image)
        write_grey_label(root / "masks" / split / f"street_{i}.png", ids)
    return root


def make_photos(root: Path) -> Path:
    """Unlabelled photos as users have them: mixed sizes, RGB/grey/RGBA PNG and JPEG, and two
    files with one stem (``street.jpg``, ``street.png``)."""
    root.mkdir(parents=True, exist_ok=True)
    image, _ = scene(0, 0, (50, 70))
    Image.fromarray(image).save(root / "street.jpg", quality=90)
    Image.fromarray(scene(1, 0, (40, 100))[0]).save(root / "street.png")
    Image.fromarray(scene(2, 0, (33, 47))[0][..., 0]).save(root / "grey.png")
    rgba = np.dstack([scene(3, 0, (64, 64))[0], np.full((64, 64), 128, np.uint8)])
    Image.fromarray(rgba).save(root / "alpha.png")
    return root


def make_mine(root: Path) -> Path:
    """A custom labelled folder: ``images/val/*.png`` and ``masks/val/*.png`` (train ids)."""
    return make_folder(root, split="val")


#: dataset folder under the data root -> its maker; the relative roots the presets name.
MAKERS = {
    "gtav": make_gtav,
    "cityscapes": make_cityscapes,
    "bdd100k": make_bdd100k,
    "mapillary": make_mapillary,
    "synthia": make_synthia,
    "acdc": make_acdc,
    "photos": make_photos,
    "mine": make_mine,
}


def make_data_root(data_root: Path, names=tuple(MAKERS)) -> Path:
    """Fake copies of the named datasets under ``data_root/<name>``."""
    for name in names:
        MAKERS[name](data_root / name)
    if "gtav" in names:  # a split list kept apart from the dataset (docs/datasets.md)
        (data_root / "splits").mkdir(parents=True, exist_ok=True)
        (data_root / "splits" / "gtav_val.txt").write_text((data_root / "gtav" / "val.txt").read_text())
    return data_root
