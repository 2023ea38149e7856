"""``deft-lightning export``: a checkpoint's inference network in smp's own format.

    deft-lightning export --ckpt_path run/checkpoints/last.ckpt --out exported/

writes smp's ``save_pretrained`` folder (``config.json`` + ``model.safetensors``), loadable
offline with ``segmentation_models_pytorch.from_pretrained(out)`` and no deft-lightning
installed, plus ``preprocessing.json``: the input normalisation the weights expect
(images as RGB in [0, 1], then ``(x - mean) / std``). The exported network is the task's
``inference_net()``: the EMA net for joint + EMA, the chosen final-model pair for DeFT.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from jsonargparse import auto_cli

from .tasks.base import SegmentationTask


def load_task(ckpt_path: str | Path) -> SegmentationTask:
    """The task a checkpoint was written by (its class is recorded in the checkpoint)."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    class_path = checkpoint.get("task_class")
    if class_path is None:
        raise ValueError(f"{ckpt_path} was not written by a deft-lightning task (no 'task_class' entry)")
    module_name, _, class_name = class_path.rpartition(".")
    task_class = getattr(importlib.import_module(module_name), class_name)
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    hparams["encoder_weights"] = None  # the weights come from the checkpoint
    task = task_class(**hparams)
    task.load_state_dict(checkpoint["state_dict"])
    return task.eval()


def export(*, ckpt_path: str, out: str) -> Path:
    """Write the checkpoint's inference network to ``out`` in smp's save_pretrained format.

    Keyword-only, so the command line takes ``--ckpt_path`` and ``--out`` (jsonargparse makes
    required positional parameters positional arguments).

    Args:
        ckpt_path: a checkpoint written by any deft-lightning task.
        out: output folder (created; existing files with the same names are replaced).
    """
    net = load_task(ckpt_path).inference_net()
    out_dir = Path(out)
    net.to_smp().save_pretrained(out_dir)
    preprocessing = {"input_range": [0, 1], "mean": net.input_mean.flatten().tolist(),
                     "std": net.input_std.flatten().tolist()}
    (out_dir / "preprocessing.json").write_text(json.dumps(preprocessing, indent=2) + "\n")
    print(f"exported {type(net).__name__} from {ckpt_path} to {out_dir}")
    return out_dir


def main(argv: list[str]) -> None:
    auto_cli(export, args=argv)
