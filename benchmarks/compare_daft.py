"""LP, FT, LP-FT and DAFT, and BN conversion on/off (DAFT Tables 1 and 5), on the synthetic domains.

Every row is a method config from ``configs/`` (plus its Table 5 overlay), run through the
library's LightningCLI parser with the same overrides: the same seed, data, number of steps and
evaluation. Each run trains on the synthetic ``clear`` domain and the *final* model (as in the
paper) is tested on the held-out ``clear`` split and on every other synthetic domain. LP-FT's
FT stage starts from the LP run's last checkpoint, so LP-FT trains for twice the steps in all.
No validation during training, so nothing is selected on any domain. With ``--seeds 0 1 2``
every row is run once per training seed (``seed_everything``; the synthetic images stay the
same) and each cell is the mean ± sample standard deviation over the seeds; the on/off
differences are paired by seed.

    python benchmarks/compare_daft.py --steps 150 --seeds 0 1 2 --out runs/compare_daft

Writes the per-domain mIoU table and the BN conversion on/off differences to
docs/results_daft.md (``--no-doc``: print only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from compare_methods import mean_std  # the same cell format as the other comparison tables

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results_daft.md"
ABLATIONS = "configs/ablations/daft"

# Row name -> config files, in run order (LP before LP-FT, whose FT stage starts from it).
ROWS: dict[str, list[str]] = {
    "LP": ["configs/lp.yaml"],
    "FT": ["configs/ft.yaml"],
    "FT + BN conversion": ["configs/ft.yaml", f"{ABLATIONS}/ft_bn_conversion.yaml"],
    "LP-FT": ["configs/lpft.yaml"],
    "LP-FT + BN conversion": ["configs/lpft.yaml", f"{ABLATIONS}/lpft_bn_conversion.yaml"],
    "Integrated LP-FT": ["configs/daft.yaml", f"{ABLATIONS}/integrated_lpft.yaml"],
    "DAFT (integrated LP-FT + BN conversion)": ["configs/daft.yaml"],
}
PAIRS = [("FT", "FT + BN conversion"), ("LP-FT", "LP-FT + BN conversion"),
         ("Integrated LP-FT", "DAFT (integrated LP-FT + BN conversion)")]


def slug(row: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in row.split(" (")[0].lower()).replace("__", "_")


def run(row: str, configs: list[str], seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Fit one row from its configs, then test its final model; returns the test metrics."""
    from deft_lightning.cli import lightning_cli

    overrides = [
        f"--seed_everything={seed}",
        "--trainer.accelerator=cpu", "--trainer.devices=1", f"--trainer.precision={args.precision}",
        f"--trainer.max_steps={args.steps}", "--trainer.limit_val_batches=0", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir=runs/{slug(row)}",
        f"--data.init_args.synthetic_val_size={args.eval_images}",
        f"--model.init_args.bn_conversion_batches={args.conversion_batches}",  # used where conversion is on
    ]
    if "configs/lpft.yaml" in configs:  # the LP row's checkpoint, named explicitly
        overrides.append("--model.init_args.init_checkpoint=runs/lp/checkpoints/last.ckpt")
    cli = lightning_cli([arg for config in configs for arg in ("--config", str(ROOT / config))] + overrides,
                        run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = time.perf_counter() - start
    metrics = cli.trainer.test(cli.model, cli.datamodule, verbose=False)[0]
    return {**{key: float(value) for key, value in metrics.items()}, "fit_seconds": seconds}


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """One row per method, cells over its seeds; then the BN conversion on − off pairs."""
    domains = [key.split("/")[1] for key in results[next(iter(results))][0] if key.endswith("/mIoU")]
    lines = ["| method | " + " | ".join(f"{d} (source)" if d == "clear" else d for d in domains)
             + " | mean over targets | seeds | fit time (s) |",
             "|---|" + "---|" * (len(domains) + 3)]
    for row, runs in results.items():
        cells = [mean_std([100 * m[f"test/{d}/mIoU"] for m in runs]) for d in domains]
        lines.append(f"| {row} | " + " | ".join(cells)
                     + f" | **{mean_std([100 * m['test/mIoU_mean'] for m in runs])}** | {len(runs)}"
                     + f" | {statistics.mean(m['fit_seconds'] for m in runs):.0f} |")
    lines += ["", "BN conversion on minus off (mIoU points, paired by seed):", "",
              "| pair | source (clear) | mean over targets |", "|---|---|---|"]
    for off, on in PAIRS:
        if off in results and on in results:
            pairs = list(zip(results[off], results[on]))
            source = [100 * (b["test/clear/mIoU"] - a["test/clear/mIoU"]) for a, b in pairs]
            target = [100 * (b["test/mIoU_mean"] - a["test/mIoU_mean"]) for a, b in pairs]
            lines.append(f"| {on} vs {off} | {signed(source)} | {signed(target)} |")
    return "\n".join(lines)


def signed(values: list[float]) -> str:
    text = mean_std(values)
    return text if text.startswith("-") else "+" + text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run (LP-FT: per stage)")
    parser.add_argument("--conversion-batches", type=int, default=32, help="BN conversion calibration batches")
    parser.add_argument("--eval-images", type=int, default=64, help="held-out images per domain")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare_daft")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds, one run each")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help="a subset of the rows, by name")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    args.out = args.out.resolve()
    results: dict[str, list[dict[str, float]]] = {}
    for seed in args.seeds:
        seed_dir = args.out / f"seed{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        os.chdir(seed_dir)  # this seed's LP run: runs/lp/checkpoints/last.ckpt, LP-FT's init_checkpoint
        results_file = seed_dir / "results.json"
        done = json.loads(results_file.read_text()) if results_file.exists() else {}
        for row in args.rows:
            if row in done:
                print(f"{row}, seed {seed}: done before, kept", flush=True)
            else:
                done[row] = run(row, ROWS[row], seed, args)
                results_file.write_text(json.dumps(done, indent=1))
                print(f"{row}, seed {seed}: test mIoU mean over targets "
                      f"{100 * done[row]['test/mIoU_mean']:.1f}", flush=True)
            results.setdefault(row, []).append(done[row])
    ordered = {row: results[row] for row in ROWS if row in results}
    text = table(ordered)
    print(text)
    if not args.no_doc:
        command = "python benchmarks/compare_daft.py " + " ".join(sys.argv[1:])
        DOC.write_text(DOC_HEADER.format(command=command, seeds=", ".join(map(str, args.seeds)), steps=args.steps, batches=args.conversion_batches,
                                         eval_images=args.eval_images, precision=args.precision,
                                         threads=args.threads, torch=torch.__version__)
                       + text + "\n" + DOC_FOOTER)
        print(f"written to {DOC}")


DOC_HEADER = """# DAFT and its baselines on the synthetic domains

LP, FT, LP-FT and DAFT (Table 1 of Ha et al., AAAI 2024) and BN conversion on/off for FT,
LP-FT and integrated LP-FT (their Table 5), each from its config in `configs/` with the same
overrides: Unet + ImageNet MobileNetV2 (`imagenet-offline`), SGD, poly schedule, seeds {seeds}, the
synthetic `clear` domain for training (batch 8, 128x256), {steps} optimizer steps per run (LP-FT:
{steps} of LP, then {steps} of FT from the LP weights), BN conversion on {batches} training
batches where it is on, precision {precision}, CPU threads: {threads} (torch {torch}), no GPU. The
*final* model of each run is tested on {eval_images} held-out images per domain: `clear` (source)
and the five other synthetic domains (targets). No validation during training, so nothing was
selected on any domain. Learning rates are the configs' a-priori values (FT 0.01; LP head 0.01;
LP-FT 0.001; DAFT η_θ = 0.01, η_w = 0.1), not swept.

Command: `{command}`

mIoU (%) per domain, final model:

"""

DOC_FOOTER = """
Reading: short CPU runs on procedural data; a difference smaller than the seed-to-seed
standard deviations above is not meaningful. LP-FT's fit time is its FT stage only.
These numbers say the methods run end to end from their
configs and how they compare in this small setting, not how they compare on real
benchmarks (the paper's segmentation results are in-distribution Cityscapes/VOC numbers,
docs/methods.md section 3).
"""


if __name__ == "__main__":
    main()
