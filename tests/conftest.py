"""Shared test set-up: no network, two threads, tiny nets and data."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

# A small randomly initialised net: fast on CPU, still a real smp encoder-decoder with BN.
TINY_NET = {"arch": "Unet", "encoder_name": "resnet18", "encoder_weights": None,
            "arch_kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}}

# Synthetic data at 64x128 with a handful of images, augmentation off unless a test wants it.
TINY_DATA = {"synthetic_train_size": 8, "synthetic_val_size": 4, "synthetic_image_size": (64, 128),
             "crop_size": (64, 128), "batch_size": 4, "eval_batch_size": 4, "augment": False,
             "shuffle": False, "synthetic_targets": ["night", "fog"]}


@pytest.fixture
def tiny_net_kwargs():
    return dict(TINY_NET)


@pytest.fixture
def tiny_data_kwargs():
    return dict(TINY_DATA)


def trainer_kwargs(tmp_path, **overrides):
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                  num_sanity_val_steps=0, limit_val_batches=0, deterministic=True)
    kwargs.update(overrides)
    return kwargs
