"""DGSegDataModule: synthetic default, real-dataset entries, one eval loader per domain."""

from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from deft_lightning import DatasetSpec, DGSegDataModule
from deft_lightning.data.synthetic import DOMAINS, SOURCE_DOMAIN


def test_synthetic_default_has_source_split_and_every_other_domain(tiny_data_kwargs):
    kwargs = dict(tiny_data_kwargs, synthetic_targets=None)
    dm = DGSegDataModule(**kwargs)
    dm.setup("fit")
    assert dm.eval_domains == [SOURCE_DOMAIN] + [d for d in DOMAINS if d != SOURCE_DOMAIN]
    assert dm.source_val_domain == SOURCE_DOMAIN
    loaders = dm.val_dataloader()
    assert len(loaders) == len(dm.eval_domains)
    batch = next(iter(loaders[1]))
    assert set(batch["domain"]) == {dm.eval_domains[1]}
    # The held-out source split never overlaps the training images.
    train_names = {dm.train_set[i]["name"] for i in range(len(dm.train_set))}
    assert not train_names & {s["name"] for s in dm.eval_sets[SOURCE_DOMAIN]}


def test_training_batches_are_augmented_crops(tiny_data_kwargs):
    dm = DGSegDataModule(**dict(tiny_data_kwargs, augment=True, crop_size=(32, 64), batch_size=2))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 64) and batch["mask"].shape == (2, 32, 64)
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


@pytest.mark.parametrize("class_uniform_pct", [0.0, 0.5])
def test_ddp_ranks_draw_different_augmentations(tiny_data_kwargs, class_uniform_pct):
    """Each rank seeds its crops (and class draws) with seed + rank; equal seeds would give every
    rank the same crop boxes and, with class-uniform sampling, the very same images."""
    samples = []
    for rank in (0, 1, 0):
        dm = DGSegDataModule(**dict(tiny_data_kwargs, augment=True, crop_size=(32, 64),
                                    class_uniform_pct=class_uniform_pct))
        dm.trainer = SimpleNamespace(global_rank=rank)
        dm.setup("fit")
        samples.append(torch.stack([dm.train_set[i]["image"] for i in range(4)]))
    assert torch.equal(samples[0], samples[2]) and not torch.equal(samples[0], samples[1])


def write_folder(root, n, bad_mask=False):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        cv2.imwrite(str(root / "images" / f"im{i}.png"), np.full((32, 64, 3), 40 * i, np.uint8))
        mask = np.full((32, 64), i % 19, np.uint8)
        if bad_mask:
            mask[0, 0] = 40
        cv2.imwrite(str(root / "masks" / f"im{i}.png"), mask)


def test_real_dataset_entries_name_the_eval_domains(tmp_path, tiny_data_kwargs):
    write_folder(tmp_path / "a", 4)
    write_folder(tmp_path / "b", 3)
    spec = lambda name, domain=None: DatasetSpec("folder", str(tmp_path / name / "images"), "", domain,
                                                 {"mask_root": str(tmp_path / name / "masks")})
    dm = DGSegDataModule(source=spec("a"), source_val=spec("a", "a-val"), targets=[spec("b", "b")],
                         batch_size=2, eval_batch_size=2, augment=False, crop_size=(32, 64))
    dm.setup("fit")
    assert dm.eval_domains == ["a-val", "b"]
    assert dm.source_val_domain == "a-val"
    assert len(dm.train_set) == 4
    batch = next(iter(dm.val_dataloader()[1]))
    assert batch["mask"][0, 0, 0].item() == 0 and set(batch["domain"]) == {"b"}


def test_missing_dataset_folder_is_named(tmp_path):
    dm = DGSegDataModule(targets=[DatasetSpec("cityscapes", str(tmp_path / "nowhere"), "val")])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dm.setup("validate")


def test_bad_mask_ids_are_named_when_read(tmp_path):
    write_folder(tmp_path / "a", 2, bad_mask=True)
    dm = DGSegDataModule(targets=[DatasetSpec("folder", str(tmp_path / "a/images"), "", "a",
                                              {"mask_root": str(tmp_path / "a/masks")})])
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"im0\.png"):
        dm.eval_sets["a"][0]


def test_unknown_synthetic_domain_lists_the_known_ones():
    with pytest.raises(ValueError, match="known"):
        DGSegDataModule(synthetic_targets=["mars"])


def test_a_synthetic_split_typo_is_refused_not_served_as_the_held_out_images(tiny_data_kwargs):
    dm = DGSegDataModule(**tiny_data_kwargs, source=DatasetSpec("synthetic", split="trian"), targets=[])
    with pytest.raises(ValueError, match="unknown split 'trian'; known: train, val, test"):
        dm.setup("fit")


def test_an_evaluation_batch_of_images_of_different_sizes_is_one_clear_error(tmp_path):
    """eval_batch_size > 1 over a set of mixed sizes (a folder, Mapillary with size: null) cannot be
    stacked: the error names the domain, the sizes and the setting, not torch.stack's shapes."""
    from fake_datasets import make_photos

    photos = make_photos(tmp_path / "photos")
    dm = DGSegDataModule(targets=[DatasetSpec("folder", str(photos), "", "photos")], synthetic_val_size=2,
                         synthetic_image_size=(32, 64), eval_batch_size=2)
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"domain 'photos'.*\(33, 47\), \(64, 64\).*eval_batch_size=1"):
        next(iter(dm.val_dataloader()[1]))
    assert next(iter(dm.val_dataloader()[0]))["image"].shape == (2, 3, 32, 64)  # one size: batched as before
