"""Dataset readers on tiny fake dataset trees: id maps to train ids, layouts, sample format,
and errors that name the file or folder at fault."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch

import fake_datasets
from fake_datasets import write_grey_label, write_palette_label, write_png16_rgb
from deft_lightning.data.datasets import (
    DATASETS,
    ACDCDataset,
    BDD100KDataset,
    CityscapesDataset,
    FolderDataset,
    GTAVDataset,
    MapillaryDataset,
    SynthiaDataset,
    build_dataset,
)

H, W = 32, 64
RGB = (200, 100, 50)
FRANKFURT_IMAGE = "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"
LINDAU_LABEL = "gtFine/val/lindau/lindau_000001_000019_gtFine_labelIds.png"


def write_image(path: Path, height: int = H, width: int = W, rgb=RGB) -> Path:
    return fake_datasets.write_image(path, height, width, rgb)


def three_ids(a: int, b: int, c: int) -> np.ndarray:
    """An (H, W) id map: left third ``a``, middle third ``b``, right third ``c``."""
    ids = np.full((H, W), c, np.uint16)
    ids[:, : W // 3] = a
    ids[:, W // 3 : 2 * W // 3] = b
    return ids


def assert_three_train_ids(mask: torch.Tensor, a: int, b: int, c: int) -> None:
    assert mask[0, 0] == a and mask[0, W // 2] == b and mask[0, W - 1] == c


@pytest.fixture
def cityscapes_root(tmp_path: Path) -> Path:
    root = tmp_path / "cityscapes"
    for city, frame in [("frankfurt", "000000_000294"), ("lindau", "000001_000019")]:
        write_image(root / "leftImg8bit" / "val" / city / f"{city}_{frame}_leftImg8bit.png")
        # 26 car -> 13, 7 road -> 0, 5 (dynamic, not a train class) -> 255
        label = root / "gtFine" / "val" / city / f"{city}_{frame}_gtFine_labelIds.png"
        write_grey_label(label, three_ids(26, 7, 5))
    return root


def test_cityscapes_maps_label_ids_to_train_ids_in_the_sample_format(cityscapes_root: Path):
    dataset = CityscapesDataset(str(cityscapes_root), "val")
    assert len(dataset) == 2
    sample = dataset[0]
    assert set(sample) == {"image", "mask", "domain", "name"}
    image, mask = sample["image"], sample["mask"]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert torch.allclose(image[:, 0, 0], torch.tensor(RGB) / 255.0), "channels must be RGB"
    assert mask.dtype == torch.int64 and mask.shape == (H, W)
    assert_three_train_ids(mask, 13, 0, 255)
    assert sample["domain"] == "cityscapes"
    assert sample["name"] == "frankfurt_000000_000294_leftImg8bit"


def test_build_dataset_passes_domain_and_transform(cityscapes_root: Path):
    flip = A.HorizontalFlip(p=1.0)
    dataset = build_dataset("cityscapes", str(cityscapes_root), "val", domain="cs", transform=flip)
    sample = dataset[1]
    assert sample["domain"] == "cs"
    assert_three_train_ids(sample["mask"], 255, 0, 13)


def test_build_dataset_unknown_name_lists_the_known_ones(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown dataset 'kitti'") as error:
        build_dataset("kitti", str(tmp_path), "val")
    for name in DATASETS:
        assert name in str(error.value)


def test_gtav_palette_labels_split_list_and_size_mismatch_skip(tmp_path: Path):
    root = tmp_path / "gtav"
    for name in ["00001", "00002", "00003"]:
        write_image(root / "images" / f"{name}.png")
        write_palette_label(root / "labels" / f"{name}.png", three_ids(26, 24, 0))
    # RobustNet's rule: a pair whose image and label sizes differ is skipped.
    write_palette_label(root / "labels" / "00002.png", np.zeros((H // 2, W // 2)))
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 .*00002\.png"):
        dataset = GTAVDataset(str(root), "all")
    assert [image.stem for image, _ in dataset.pairs] == ["00001", "00003"]
    assert_three_train_ids(dataset[0]["mask"], 13, 11, 255)
    assert dataset[0]["domain"] == "gtav"

    (root / "train.txt").write_text("00001.png\n00003\n\n")
    assert len(GTAVDataset(str(root), "train")) == 2
    (root / "val.txt").write_text("00001\n09999\n")
    with pytest.raises(FileNotFoundError, match=r"09999\.png"):
        GTAVDataset(str(root), "val")
    with pytest.raises(FileNotFoundError, match=r"test\.txt"):
        GTAVDataset(str(root), "test")


@pytest.mark.parametrize(
    "images, labels, label_name",
    [
        ("images/10k/val", "labels/sem_seg/masks/val", "{}.png"),
        ("images/val", "labels/val", "{}_train_id.png"),
    ],
    ids=["official", "authors"],
)
def test_bdd100k_both_layouts_keep_train_ids(tmp_path: Path, images, labels, label_name):
    root = tmp_path / "bdd100k"
    write_image(root / images / "7d2f7975-e0c1c5a7.jpg")
    write_grey_label(root / labels / label_name.format("7d2f7975-e0c1c5a7"), three_ids(13, 18, 255))
    dataset = BDD100KDataset(str(root), "val")
    assert len(dataset) == 1
    sample = dataset[0]
    assert_three_train_ids(sample["mask"], 13, 18, 255)
    assert sample["domain"] == "bdd100k" and sample["image"].shape == (3, H, W)


def test_train_id_mask_with_ids_outside_0_18_names_the_file(tmp_path: Path):
    root = tmp_path / "bdd100k"
    write_image(root / "images" / "10k" / "val" / "a.jpg")
    label = root / "labels" / "sem_seg" / "masks" / "val" / "a.png"
    write_grey_label(label, three_ids(13, 19, 40))
    with pytest.raises(ValueError, match=r"a\.png.*\[19, 40\]") as error:
        BDD100KDataset(str(root), "val")[0]
    assert str(label) in str(error.value)


def make_mapillary(root: Path, height: int, width: int, ids: np.ndarray) -> Path:
    write_image(root / "validation" / "images" / "scene.jpg", height, width)
    write_palette_label(root / "validation" / "labels" / "scene.png", ids)
    return root


def test_mapillary_maps_ids_and_centre_crops_wide_images(tmp_path: Path):
    ids = np.full((H, W), 2, np.uint8)  # sidewalk -> 1
    ids[:, : W // 2] = 55  # car -> 13
    root = make_mapillary(tmp_path / "mapillary", H, W, ids)
    # 32x64 -> height 16 -> 16x32 -> the centre 16 columns: 8 of car, 8 of sidewalk.
    sample = MapillaryDataset(str(root), "val", size=16)[0]
    assert sample["image"].shape == (3, 16, 16) and sample["mask"].shape == (16, 16)
    assert (sample["mask"][:, :8] == 13).all() and (sample["mask"][:, 8:] == 1).all()
    assert sample["domain"] == "mapillary"

    native = MapillaryDataset(str(root), "validation", size=None)[0]
    assert native["mask"].shape == (H, W)
    assert MapillaryDataset(str(root), "validation")[0]["mask"].shape == (1536, 1536)


def test_mapillary_pads_tall_images_with_ignore_labels_and_black(tmp_path: Path):
    ids = np.full((W, H), 0, np.uint8)  # 0 (bird) is not a train class -> 255
    ids[W // 2 :] = 13  # road -> 0
    root = make_mapillary(tmp_path / "mapillary", W, H, ids)
    # 64x32 (tall) -> height 16 -> 16x8 -> padded by 4 columns each side.
    sample = MapillaryDataset(str(root), "validation", size=16)[0]
    mask, image = sample["mask"], sample["image"]
    assert mask.shape == (16, 16)
    assert (mask[:, :4] == 255).all() and (mask[:, 12:] == 255).all()
    assert (image[:, :, :4] == 0).all() and (image[:, :, 12:] == 0).all()
    assert (mask[:8, 4:12] == 255).all() and (mask[8:, 4:12] == 0).all()
    assert torch.allclose(image[:, 8, 8], torch.tensor(RGB) / 255.0, atol=2 / 255)


def test_mapillary_downscale_is_antialiased_as_pil_bicubic(tmp_path: Path):
    """One-pixel black/white stripes shrunk 3x average to grey (PIL's bicubic, the authors');
    OpenCV's INTER_CUBIC samples every third column and returns full-contrast stripes."""
    stripes = np.zeros((48, 96, 3), np.uint8)
    stripes[:, ::2] = 255
    root = make_mapillary(tmp_path / "mapillary", 48, 96, np.full((48, 96), 55, np.uint8))
    fake_datasets.write_rgb(root / "validation" / "images" / "scene.jpg", stripes)
    image = MapillaryDataset(str(root), "validation", size=16)[0]["image"]
    assert image.shape == (3, 16, 16)
    inner = image[:, 2:-2, 2:-2]
    assert abs(inner.mean().item() - 0.5) < 0.05 and inner.std().item() < 0.05


def test_synthia_reads_the_class_from_the_first_channel_of_the_16_bit_label(tmp_path: Path):
    root = tmp_path / "synthia"
    label = np.zeros((H, W, 3), np.uint16)
    label[..., 0] = three_ids(8, 21, 300)  # class: car -> 13, 21 -> wall 3, 300 -> 255
    label[..., 1] = 3  # instance id; read as the class it would be road (0)
    label[..., 2] = 1  # third channel; read as the class it would be sky (10)
    for name in ["0000000", "0000001"]:
        write_image(root / "RGB" / f"{name}.png")
        write_png16_rgb(root / "GT" / "LABELS" / f"{name}.png", label)
    dataset = SynthiaDataset(str(root), "all")
    assert len(dataset) == 2
    sample = dataset[0]
    assert_three_train_ids(sample["mask"], 13, 3, 255)
    assert sample["domain"] == "synthia"

    (root / "val.txt").write_text("0000001\n")
    assert [image.stem for image, _ in SynthiaDataset(str(root), "val").pairs] == ["0000001"]


@pytest.fixture
def acdc_root(tmp_path: Path) -> Path:
    root = tmp_path / "acdc"
    for condition in ["fog", "night", "rain", "snow"]:
        stem = f"GOPR0475_{condition}_frame_000041"
        write_image(root / "rgb_anon" / condition / "val" / "GOPR0475" / f"{stem}_rgb_anon.png")
        label = root / "gt" / condition / "val" / "GOPR0475" / f"{stem}_gt_labelIds.png"
        write_grey_label(label, three_ids(26, 23, 0))
    return root


def test_acdc_conditions_and_nested_sequences(acdc_root: Path):
    every = ACDCDataset(str(acdc_root), "val")
    assert len(every) == 4 and every[0]["domain"] == "acdc"
    fog = build_dataset("acdc", str(acdc_root), "val", condition="fog")
    assert len(fog) == 1 and fog[0]["domain"] == "acdc-fog"
    assert_three_train_ids(fog[0]["mask"], 13, 10, 255)
    with pytest.raises(ValueError, match="'haze'"):
        ACDCDataset(str(acdc_root), "val", condition="haze")


def test_folder_of_images_with_and_without_masks(tmp_path: Path):
    images = tmp_path / "images" / "val"
    write_image(images / "b.jpg")
    write_image(images / "a.png")
    (images / "notes.txt").write_text("not an image")
    unlabelled = FolderDataset(str(images))
    assert [sample["name"] for sample in unlabelled] == ["a", "b"]
    assert (unlabelled[0]["mask"] == 255).all() and unlabelled[0]["domain"] == "val"

    masks = tmp_path / "masks" / "val"
    write_grey_label(masks / "a.png", three_ids(0, 13, 255))
    with pytest.raises(FileNotFoundError, match=r"b\.jpg.*b\.png"):
        FolderDataset(str(images), mask_root=str(masks))
    write_grey_label(masks / "b.png", three_ids(0, 19, 255))
    labelled = build_dataset(
        "folder", str(tmp_path / "images"), "val", domain="mine", mask_root=str(tmp_path / "masks")
    )
    assert labelled[0]["domain"] == "mine"
    assert_three_train_ids(labelled[0]["mask"], 0, 13, 255)
    with pytest.raises(ValueError, match=r"masks/val/b\.png.*\[19\]"):
        labelled[1]


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_missing_dataset_folder_is_named(tmp_path: Path, name: str):
    missing = tmp_path / "not_downloaded"
    with pytest.raises(FileNotFoundError, match="folder not found") as error:
        build_dataset(name, str(missing), "val")
    assert str(missing) in str(error.value)
    a_file = tmp_path / "photo.png"  # a root that is one image, as given to predict_root
    a_file.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"expected a folder, found a file: {a_file}"):
        build_dataset(name, str(a_file), "val" if name != "folder" else "")


def test_missing_split_folder_and_empty_listing_name_the_folder(cityscapes_root: Path):
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/train\n.*gtFine") as error:
        CityscapesDataset(str(cityscapes_root), "train")
    assert "expected layout" in str(error.value)
    (cityscapes_root / "leftImg8bit" / "test").mkdir()
    (cityscapes_root / "gtFine" / "test").mkdir()
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/test/\*/\*_leftImg8bit\.png"):
        CityscapesDataset(str(cityscapes_root), "test")


def test_image_without_label_names_the_expected_label(cityscapes_root: Path):
    label = cityscapes_root / LINDAU_LABEL
    label.unlink()
    with pytest.raises(FileNotFoundError, match="lindau_000001_000019_leftImg8bit.png") as error:
        CityscapesDataset(str(cityscapes_root), "val")
    assert str(label) in str(error.value)


def test_undecodable_image_and_label_are_named(cityscapes_root: Path):
    image = cityscapes_root / FRANKFURT_IMAGE
    image.write_bytes(b"not a png" * 20)
    dataset = CityscapesDataset(str(cityscapes_root), "val")
    with pytest.raises(OSError, match="cannot decode") as error:
        dataset[0]
    assert str(image) in str(error.value)

    label = cityscapes_root / LINDAU_LABEL
    label.write_bytes(b"\x89PNG garbage")
    with pytest.raises(OSError, match="cannot decode label") as error:
        dataset[1]
    assert str(label) in str(error.value)


def test_image_and_label_of_different_sizes_are_named(cityscapes_root: Path):
    label = cityscapes_root / LINDAU_LABEL
    write_grey_label(label, np.zeros((H, W // 2)))
    with pytest.raises(ValueError, match="64x32.*32x32") as error:
        CityscapesDataset(str(cityscapes_root), "val")[1]
    assert str(label) in str(error.value)
    assert "lindau_000001_000019_leftImg8bit.png" in str(error.value)
