"""``deft-lightning merge``: several checkpoints -> one checkpoint holding the merged net.

    deft-lightning merge --checkpoints a.ckpt b.ckpt c.ckpt --anchor c.ckpt --out merged.ckpt
    deft-lightning merge --checkpoints run/checkpoints/*.ckpt --last 4 --out merged.ckpt

Inputs are task checkpoints of any method (their ``inference_net()``), state-dict files or
exported folders (:func:`deft_lightning.merging.load_net_state`); see
:mod:`deft_lightning.merging` for the weights. The output is a ``JointFinetune`` checkpoint
of the merged net with the anchor's net arguments, which ``validate``/``test``/``predict``
(``--ckpt_path``) and ``export`` load like any other. It is written atomically
(:func:`deft_lightning.atomic_io.atomic_torch_save`: a temporary file in the output's folder,
fsync, rename), so an interrupted or failed merge leaves no partial file and never touches an
existing ``--out``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning
import torch
from jsonargparse import auto_cli

from .atomic_io import atomic_torch_save
from .merging import MergeError, Mode, Parts, merge_inputs
from .safe_load import CheckpointError, load_checkpoint
from .tasks.joint import JointFinetune

#: The task class of a merged checkpoint: it evaluates and exports its ``net`` as it is.
MERGED_TASK = f"{JointFinetune.__module__}.{JointFinetune.__qualname__}"


def merge(
    *,
    checkpoints: list[str],
    out: str,
    anchor: str | None = None,
    power: float = 1.0,
    anchor_max: float = 1.0,
    mode: Mode = "layerwise",
    parts: Parts = "all",
    alpha: float = 0.5,
    pretrained: str | None = None,
    last: int | None = None,
    net: dict[str, Any] | None = None,
) -> Path:
    """Merge checkpoints layer-wise (or as a soup, or WiSE-FT) into one task checkpoint.

    Args:
        checkpoints: the inputs: task checkpoints, state-dict files or exported folders
            (space-separated; shell globs work).
        out: the merged checkpoint to write.
        anchor: the input the last layers lean toward; must be one of ``checkpoints``.
            Default: the first one (with ``last``: the newest).
        power: ``p`` in ``w_anchor(t) = 1/K + (anchor_max − 1/K) · t^p``.
        anchor_max: the anchor's weight at the last layer, in [1/K, 1].
        mode: ``layerwise`` (the paper's), ``uniform`` (model soup, 1/K everywhere) or ``wise``
            (one checkpoint's encoder interpolated toward its pretrained encoder by ``alpha``).
        parts: ``all``, or ``encoder`` to merge the encoders of nets with different decoders
            (the rest from the anchor).
        alpha: WiSE-FT's weight of the finetuned encoder.
        pretrained: WiSE-FT's pretrained encoder weights (``imagenet-offline`` or a local file);
            default: the run's own ``encoder_weights``.
        last: merge only the ``last`` newest of ``checkpoints`` by the global step each task
            checkpoint records (equal steps, e.g. ``last.ckpt`` and its ``step=`` twin, count
            once): the last checkpoints of one run.
        net: ``SegmentationNet`` arguments (``arch``, ``encoder_name``, ``num_classes``,
            ``arch_kwargs``) when the anchor is a bare state-dict file, which does not record them
            (a ``.safetensors`` anchor's tensors are also put in this net's order for the depths).
    """
    if Path(out).is_dir():
        raise MergeError(f"--out {out} is a folder; give the merged checkpoint's file name (e.g. {Path(out) / 'merged.ckpt'})")
    paths = newest_checkpoints(checkpoints, last) if last is not None else list(checkpoints)
    anchor_index = _anchor_index(paths, anchor)
    state, anchor_state = merge_inputs(paths, anchor_index, power, anchor_max, mode, parts, alpha, pretrained, net)
    config = anchor_state.config if net is None else net
    if config is None:
        raise MergeError(f"the anchor {anchor_state.name} is a bare state dict that does not record its net: "
                         f"pass --net '{{arch: ..., encoder_name: ..., num_classes: ..., arch_kwargs: ...}}'")
    provenance = {"inputs": [str(p) for p in paths], "anchor": str(paths[anchor_index]), "mode": mode,
                  "parts": parts, "power": power, "anchor_max": anchor_max,
                  **({"alpha": alpha, "pretrained": pretrained} if mode == "wise" else {})}
    out_path = Path(out)
    atomic_torch_save(merged_checkpoint(state, config, provenance), out_path)
    print(f"merged {len(paths)} input(s) ({mode}, anchor {paths[anchor_index]}) into {out_path}")
    return out_path


def merged_checkpoint(state: dict[str, torch.Tensor], config: dict[str, Any], provenance: dict[str, Any]) -> dict:
    """A ``JointFinetune`` checkpoint holding ``state`` as its net, loadable by ``--ckpt_path``,
    ``JointFinetune.load_from_checkpoint`` and ``export``. ``encoder_weights`` is ``None``: the
    weights are in the checkpoint."""
    hparams = {**config, "encoder_weights": None}
    state_dict = {f"net.{key}": value for key, value in state.items()}
    with torch.device("meta"):  # the keys and shapes must fit the net these arguments build
        JointFinetune(**hparams).load_state_dict(state_dict, assign=True)
    return {
        "state_dict": state_dict,
        # As LightningCLI writes them: the CLI and load_from_checkpoint rebuild the class.
        "hyper_parameters": {"_class_path": MERGED_TASK, "_instantiator": "lightning.pytorch.cli.instantiate_module",
                             **hparams},
        "hparams_name": "kwargs",
        "task_class": MERGED_TASK,
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
        "merge": provenance,
    }


def newest_checkpoints(paths: list[str], count: int) -> list[str]:
    """The ``count`` task checkpoints with the highest global step, newest first; files with
    the same step (``last.ckpt`` beside ``step=N.ckpt``) count once, the first by name."""
    if count < 1:
        raise MergeError(f"--last must be >= 1, got {count}")
    by_step: dict[int, str] = {}
    for path in sorted(paths):
        step = load_checkpoint(path, mmap=True).get("global_step")
        if step is None:
            raise MergeError(f"{path} records no global step: --last picks task checkpoints by step")
        by_step.setdefault(int(step), path)
    if len(by_step) < count:
        raise MergeError(f"--last {count}: only {len(by_step)} checkpoint(s) with distinct steps among {paths}")
    return [by_step[step] for step in sorted(by_step, reverse=True)[:count]]


def _anchor_index(paths: list[str], anchor: str | None) -> int:
    if anchor is None:
        return 0
    resolved = [Path(p).resolve() for p in paths]
    if Path(anchor).resolve() not in resolved:
        raise MergeError(f"--anchor {anchor} is not one of the merged checkpoints {paths}")
    return resolved.index(Path(anchor).resolve())


def _gather_list(argv: list[str], option: str) -> list[str]:
    """``--checkpoints a b c`` (what a shell glob expands to) -> ``--checkpoints '["a", "b", "c"]'``,
    the list syntax jsonargparse reads."""
    if option not in argv:
        return argv
    start = argv.index(option) + 1
    end = start
    while end < len(argv) and not argv[end].startswith("--"):
        end += 1
    values = argv[start:end]
    if len(values) == 1 and values[0].lstrip().startswith("["):
        return argv
    return [*argv[:start], json.dumps(values), *argv[end:]]


def main(argv: list[str]) -> None:
    try:
        auto_cli(merge, args=_gather_list(argv, "--checkpoints"))
    except (MergeError, CheckpointError) as error:
        sys.exit(f"deft-lightning merge: error: {error}")
