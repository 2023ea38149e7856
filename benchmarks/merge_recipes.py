"""docs/merging.md's recipes on the synthetic domains: per-domain mIoU of every input and merge.

For each training seed, three runs of the same net (MobileNetV2-Unet, ImageNet weights) from
the method configs, shortened alike (64x128, batch 4, ``--steps``): ``configs/joint.yaml``,
``configs/deft.yaml`` (decoder warm-up 10 % of the steps) and ``configs/daft.yaml``, each
keeping a checkpoint every ``--every`` steps. Then, through ``deft-lightning merge``:

(a) the last 4 checkpoints of the joint run, layer-wise (anchor: the last) and uniform;
(b) the final joint, DeFT and DAFT nets, layer-wise (anchor: DeFT) and uniform;
(c) once every seed is done, the final joint nets of all seeds, layer-wise (anchor: seed 0)
    and uniform.

Every input and merge is tested on every synthetic domain (held-out ``clear`` = source).
Cells are mean ± sample std over the seeds ((c): one value). Runs and results are kept under
``--root`` (an interrupted benchmark resumes).

    python benchmarks/merge_recipes.py --seeds 0 1 2 --out docs/merging.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402

from compare_methods import mean_std  # noqa: E402
from deft_lightning import DGSegDataModule, JointFinetune  # noqa: E402
from deft_lightning.cli import lightning_cli  # noqa: E402
from deft_lightning.merge_checkpoints import merge  # noqa: E402
from deft_lightning.merging import load_net_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"joint": "configs/joint.yaml", "deft": "configs/deft.yaml", "daft": "configs/daft.yaml"}
DATA = {"synthetic_image_size": [64, 128], "crop_size": [64, 128], "synthetic_val_size": 16, "batch_size": 4}


def fit(method: str, seed: int, steps: int, every: int, folder: Path) -> None:
    """One run of a method config, a checkpoint every ``every`` steps in ``folder``."""
    if (folder / f"step={steps}.ckpt").exists():
        print(f"{folder}: done before, kept", flush=True)
        return
    args = ["--config", str(ROOT / METHODS[method]), f"--seed_everything={seed}", f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={folder.parent}", "--trainer.callbacks+=ModelCheckpoint",
            f"--trainer.callbacks.dirpath={folder}", f"--trainer.callbacks.every_n_train_steps={every}",
            "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename={step}",
            *(f"--data.init_args.{key}={json.dumps(value)}" for key, value in DATA.items())]
    if method == "deft":
        args.append(f"--model.init_args.warmup_steps={steps // 10}")
    cli = lightning_cli(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_net(source: str, config: dict) -> dict[str, float]:
    """Test metrics of the inference net of ``source`` (any merge input) on every domain."""
    task = JointFinetune(**{**config, "encoder_weights": None})
    task.net.load_state_dict(load_net_state(source).state)
    # Test outputs (IoU table, confusion matrices) go beside the source, not into the cwd.
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=f"{Path(source).with_suffix('')}_test")
    metrics = trainer.test(task, DGSegDataModule(**DATA), verbose=False)[0]
    return {key: float(value) for key, value in metrics.items()}


def seed_rows(seed: int, steps: int, every: int, root: Path) -> dict[str, dict[str, float]]:
    """Test metrics of every input and merge of recipes (a) and (b) for one seed (cached)."""
    results_file = root / f"seed{seed}" / "results.json"
    if results_file.exists():
        return json.loads(results_file.read_text())
    folders = {method: root / f"seed{seed}" / method / "checkpoints" for method in METHODS}
    for method, folder in folders.items():
        fit(method, seed, steps, every, folder)
    final = {method: str(folder / f"step={steps}.ckpt") for method, folder in folders.items()}
    config = load_net_state(final["joint"]).config
    last4 = [str(folders["joint"] / f"step={steps - k * every}.ckpt") for k in range(4)]
    merges = root / f"seed{seed}" / "merged"
    plans = {
        "(a) joint, last 4 checkpoints, layer-wise": dict(checkpoints=last4, anchor=last4[0]),
        "(a) joint, last 4 checkpoints, uniform": dict(checkpoints=last4, mode="uniform"),
        "(b) joint + DeFT + DAFT, layer-wise (anchor DeFT)": dict(checkpoints=list(final.values()),
                                                                  anchor=final["deft"]),
        "(b) joint + DeFT + DAFT, uniform": dict(checkpoints=list(final.values()), mode="uniform"),
    }
    rows = {f"{method} (input)": test_net(path, config) for method, path in final.items()}
    for index, (name, plan) in enumerate(plans.items()):
        start = time.perf_counter()
        path = merge(out=str(merges / f"{index}.ckpt"), **plan)
        print(f"{name}: merged in {time.perf_counter() - start:.1f} s", flush=True)
        rows[name] = test_net(str(path), config)
    results_file.write_text(json.dumps(rows, indent=1))
    return rows


def seeds_rows(seeds: list[int], steps: int, root: Path) -> dict[str, dict[str, float]]:
    """Recipe (c): the final joint nets of all seeds, merged."""
    finals = [str(root / f"seed{seed}" / "joint" / "checkpoints" / f"step={steps}.ckpt") for seed in seeds]
    config = load_net_state(finals[0]).config
    rows = {}
    for mode in ("layerwise", "uniform"):
        path = merge(checkpoints=finals, mode=mode, out=str(root / f"seeds_{mode}.ckpt"))
        rows[f"(c) joint, seeds {', '.join(map(str, seeds))}, {'layer-wise (anchor seed 0)' if mode == 'layerwise' else 'uniform'}"] = \
            test_net(str(path), config)
    return rows


DOMAINS = ("clear", "dusk", "fog", "night", "snow", "desert")


def table(rows: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| input or merge | clear (source) | " + " | ".join(DOMAINS[1:]) + " | mean over targets | seeds |",
             "|---|" + "---|" * (len(DOMAINS) + 2)]
    for name, runs in rows.items():
        cells = [mean_std([100 * run[f"test/{domain}/mIoU"] for run in runs]) for domain in DOMAINS]
        mean = mean_std([100 * run["test/mIoU_mean"] for run in runs])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{mean}** | {len(runs)} |")
    return "\n".join(lines)


def replace_section(path: Path, name: str, section: str) -> None:
    """Write ``section`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else ""
    if start not in text or end not in text:
        text = text.rstrip() + f"\n\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{section}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=15)
    parser.add_argument("--root", type=Path, default=Path("runs/merge_recipes"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the table into this Markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows: dict[str, list[dict[str, float]]] = {}
    for seed in args.seeds:
        for name, metrics in seed_rows(seed, args.steps, args.every, args.root).items():
            rows.setdefault(name, []).append(metrics)
        print(table(rows), flush=True)
        write(args, table(rows), start)
    if len(args.seeds) > 1:
        for name, metrics in seeds_rows(args.seeds, args.steps, args.root).items():
            rows[name] = [metrics]
    print(table(rows))
    write(args, table(rows), start)


def write(args: argparse.Namespace, result: str, start: float) -> None:
    """The table so far into ``--out`` (after every seed: an interrupted run still reports)."""
    if args.out:
        minutes = (time.perf_counter() - start) / 60
        command = "python benchmarks/merge_recipes.py " + shlex.join(sys.argv[1:])
        replace_section(args.out, "merge-recipes", f"Command ({minutes:.0f} min on the shared 2-core CPU):\n\n"
                                                   f"    {command}\n\n{result}")


if __name__ == "__main__":
    main()
