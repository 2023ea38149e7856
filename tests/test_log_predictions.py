"""LogPredictions: the first ``images_per_domain`` images of every domain, whatever the batch size."""

from types import SimpleNamespace

import pytest
import torch

from conftest import TINY_NET
from deft_lightning import JointFinetune
from deft_lightning.callbacks import LogPredictions


@pytest.mark.parametrize("eval_batch_size", [1, 2, 4])
def test_images_per_domain_are_gathered_over_batches(monkeypatch, eval_batch_size):
    """With the presets' eval_batch_size=1, images_per_domain=3 logs 3 strips, not the first batch's one."""
    monkeypatch.setattr(LogPredictions, "_trackers", staticmethod(lambda trainer: ["tracker"]))
    task = JointFinetune(**TINY_NET, domains=["clear", "fog"]).eval()
    callback, trainer = LogPredictions(images_per_domain=3), SimpleNamespace(sanity_checking=False)
    callback.on_validation_epoch_start(trainer, task)
    images = torch.rand(4, 3, 32, 64)
    masks = torch.randint(0, 19, (4, 32, 64))
    for dataloader_idx in (0, 1):
        for batch_idx, start in enumerate(range(0, 4, eval_batch_size)):
            batch = {"image": images[start:start + eval_batch_size], "mask": masks[start:start + eval_batch_size]}
            callback.on_validation_batch_end(trainer, task, None, batch, batch_idx, dataloader_idx)
    assert {domain: len(strips) for domain, strips in callback._strips.items()} == {"clear": 3, "fog": 3}
    assert all(strip.shape == (32, 3 * 64, 3) for strip in callback._strips["fog"])


def test_strips_of_different_sizes_make_one_tensorboard_image(monkeypatch):
    """Gathered over batches (eval_batch_size=1 over a folder of mixed sizes), strips of different
    widths are padded into one column."""
    logged = []
    tracker = SimpleNamespace(experiment=SimpleNamespace(add_image=lambda tag, image, step, dataformats: logged.append(
        (tag, image.shape))))
    monkeypatch.setattr(LogPredictions, "_trackers", staticmethod(lambda trainer: [tracker]))
    task = JointFinetune(**TINY_NET, domains=["photos"]).eval()
    callback, trainer = LogPredictions(images_per_domain=2), SimpleNamespace(sanity_checking=False, global_step=7)
    callback.on_validation_epoch_start(trainer, task)
    for batch_idx, (height, width) in enumerate([(32, 64), (40, 48)]):
        batch = {"image": torch.rand(1, 3, height, width), "mask": torch.zeros(1, height, width, dtype=torch.long)}
        callback.on_validation_batch_end(trainer, task, None, batch, batch_idx, 0)
    callback.on_validation_epoch_end(trainer, task)
    assert logged == [("val/predictions/photos", (72, 3 * 64, 3))]
