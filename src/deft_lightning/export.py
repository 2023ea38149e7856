"""``deft-lightning export``: a checkpoint's inference network in smp's own format.

    deft-lightning export --ckpt_path run/checkpoints/last.ckpt --out exported/

writes smp's ``save_pretrained`` folder (``config.json`` + ``model.safetensors``), loadable
offline with ``segmentation_models_pytorch.from_pretrained(out)`` and no deft-lightning
installed, plus ``preprocessing.json``: the input normalisation the weights expect
(images as RGB in [0, 1], then ``(x - mean) / std``) and the input sizes
(``pad_to_multiple_of``: ``null`` when the model runs at any size, as smp's Unet does; else
the output stride: pad the normalised image with zeros at the bottom/right to a multiple of it
and crop the logits back, as the library does). The exported network is the task's
``inference_net()``: the EMA net for joint + EMA, the chosen final-model pair for DeFT; fed
that way it gives the library's logits at every input size.

The checkpoint is read weights-only (:mod:`deft_lightning.safe_load`) and the folder is
written atomically (:func:`deft_lightning.atomic_io.atomic_write_folder`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jsonargparse import auto_cli

from .atomic_io import atomic_write_folder
from .safe_load import CheckpointError, load_checkpoint, task_class_named
from .tasks.base import SegmentationTask


#: What an export folder holds (smp's save_pretrained writes a model card README.md too).
EXPORT_FILES = {"config.json", "model.safetensors", "README.md", "preprocessing.json"}


def load_task(ckpt_path: str | Path) -> SegmentationTask:
    """The task a checkpoint was written by (its class is recorded in the checkpoint), read
    weights-only; the class must be a SegmentationTask subclass."""
    checkpoint = load_checkpoint(ckpt_path)
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    class_path = checkpoint.get("task_class") or checkpoint.get("hyper_parameters", {}).get("_class_path")
    if class_path is None:
        raise CheckpointError(f"{ckpt_path} was not written by a deft-lightning task (no 'task_class' entry)")
    task_class = task_class_named(class_path, source=ckpt_path)
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
        out: output folder (created, or replaced as a whole once the new one is complete).
    """
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file; an export is a folder: choose a new or an export folder")
    if out_dir.exists():
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES)
        if others:
            raise FileExistsError(f"--out {out_dir} exists and is not an export folder (it holds {others[:5]}); "
                                  f"an export replaces the whole folder: choose a new or an export folder")
    net = load_task(ckpt_path).inference_net()
    model = net.to_smp()
    preprocessing = {"input_range": [0, 1], "mean": net.input_mean.flatten().tolist(),
                     "std": net.input_std.flatten().tolist(),
                     "pad_to_multiple_of": net.pad_to_multiple_of,
                     "padding": "bottom and right, value 0 after normalisation (the mean colour); "
                                "crop the logits back to the input size"}

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        (folder / "preprocessing.json").write_text(json.dumps(preprocessing, indent=2) + "\n")

    atomic_write_folder(out_dir, fill)
    print(f"exported {type(net).__name__} from {ckpt_path} to {out_dir}")
    return out_dir


def main(argv: list[str]) -> None:
    try:
        auto_cli(export, args=argv)
    except (CheckpointError, FileExistsError) as error:
        sys.exit(f"deft-lightning export: error: {error}")
