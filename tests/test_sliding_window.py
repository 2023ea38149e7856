"""Sliding-window inference: logits averaged over overlapping windows (mmsegmentation's slide)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TINY_NET
from deft_lightning import JointFinetune
from deft_lightning.sliding_window import sliding_window_logits, window_starts


def test_windows_cover_the_image_and_end_at_its_edge():
    assert window_starts(100, 40, 30) == [0, 30, 60]
    assert window_starts(101, 40, 30) == [0, 30, 60, 61]
    assert window_starts(30, 40, 30) == [0]


@pytest.mark.parametrize("size, window, stride", [((37, 91), (16, 32), (10, 20)), ((64, 64), (64, 64), (32, 32)),
                                                  ((20, 50), (32, 32), (16, 16))])
def test_equals_whole_image_inference_for_a_per_pixel_net(size, window, stride):
    """A net whose receptive field (one pixel) fits inside every window's overlap gives the same
    logits window by window as on the whole image."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 19, 1)).eval()
    images = torch.rand(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(sliding_window_logits(net, images, window, stride), net(images))


def test_overlaps_are_averaged():
    """A net that outputs a constant per window: each pixel gets the mean over its windows."""
    calls = []

    def net(crop):
        calls.append(crop.shape[-2:])
        return torch.full((1, 1, *crop.shape[-2:]), float(len(calls)))

    out = sliding_window_logits(net, torch.zeros(1, 3, 10, 30), (10, 20), (10, 10))
    assert len(calls) == 2  # windows at columns 0..19 and 10..29
    assert out[0, 0, 0, 0] == 1 and out[0, 0, 0, 15] == 1.5 and out[0, 0, 0, 29] == 2


def test_task_option_switches_evaluation_to_windows():
    task = JointFinetune(**TINY_NET, sliding_window=(32, 32), sliding_stride=(16, 16)).eval()
    whole = JointFinetune(**TINY_NET).eval()
    whole.load_state_dict(task.state_dict())
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():  # one window covers the image: identical
        torch.testing.assert_close(task(images), whole(images))
        assert task(torch.rand(1, 3, 48, 80)).shape == (1, 19, 48, 80)
    with pytest.raises(ValueError, match="stride"):
        sliding_window_logits(whole, images, (8, 8), (16, 16))


def test_docs_command_evaluates_with_windows(tmp_path, monkeypatch):
    """docs/sliding_window.md's `test --model.init_args.sliding_window=... --model.init_args.sliding_stride=...`."""
    from deft_lightning.cli import main
    from test_cli import ROOT
    from test_data_presets import TINY_ARGS

    monkeypatch.chdir(tmp_path)
    main(["test", "--config", str(ROOT / "configs/deft.yaml"), *TINY_ARGS, "--allow_untrained=true",
          "--data.init_args.synthetic_targets=[fog]", "--trainer.enable_progress_bar=false",
          "--model.init_args.sliding_window=[16,32]", "--model.init_args.sliding_stride=[8,16]"])
    (table,) = tmp_path.glob("runs/deft/version_0/test/test_iou.md")
    assert "fog" in table.read_text()


@pytest.mark.parametrize("window, stride, match", [((8, 8), (16, 16), "larger than the window"),
                                                   ((0, 8), None, "positive")])
def test_bad_window_options_are_refused_when_the_task_is_built(window, stride, match):
    """Not at the first validation (after training, when the sanity check is off)."""
    with pytest.raises(ValueError, match=match):
        JointFinetune(**TINY_NET, sliding_window=window, sliding_stride=stride)
