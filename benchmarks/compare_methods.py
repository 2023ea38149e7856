"""Fit and test several method configs on the same data and report mIoU per domain.

Every config (a YAML file, or every YAML file of a folder, in name order) is run in this process
through the library's own LightningCLI: ``fit`` with the config's seed, then ``test`` of the
weights as they are at the end of training (the last step; no checkpoint selection, so no target
data is used to choose anything). Extra arguments are passed to every run unchanged, e.g.
``--trainer.max_steps=300``. The Markdown table (one row per config, one column per domain,
then the mean over the target domains and the wall time) is printed and, with ``--out``, written
with the command that produced it between the results markers of that file (other text stays).
With ``--seeds 0 1 2`` every config is run once per training seed (``seed_everything``: weight
init, sample order, augmentation draws; the synthetic images stay the same) and each cell is
the mean ± sample standard deviation over the seeds.

    python benchmarks/compare_methods.py configs/ablations/deft/strategy --seeds 0 1 2 --out docs/results_deft.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

from deft_lightning.cli import lightning_cli  # noqa: E402
from deft_lightning.report import mean_std  # noqa: E402,F401  (compare_daft imports it from here)

MARKERS = ("<!-- results:start -->", "<!-- results:end -->")


def config_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    return files


Run = tuple[dict[str, float], list[str], str | None, float]  # metrics, domains, source, minutes


def fit_and_test(config: Path, overrides: list[str], root: Path) -> Run:
    """Test metrics, evaluation domains, source domain, and minutes for one config.

    The result is kept in ``<run folder>/result.json``; a later call with the same run folder
    and arguments reads it instead of training again (an interrupted comparison resumes).
    """
    run_dir = root / config.stem
    args = ["--config", str(config), f"--trainer.default_root_dir={run_dir}", *overrides]
    result_file = run_dir / "result.json"
    if result_file.exists():
        saved = json.loads(result_file.read_text())
        if saved["args"] == args:
            print(f"{run_dir}: done before, kept", flush=True)
            return saved["metrics"], saved["domains"], saved["source"], saved["minutes"]
    start = time.perf_counter()
    cli = lightning_cli(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = {key: float(value) for key, value in
               cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0].items()}
    minutes = (time.perf_counter() - start) / 60
    domains, source = list(cli.datamodule.eval_domains), cli.datamodule.source_val_domain
    result_file.write_text(json.dumps({"args": args, "metrics": metrics, "domains": domains,
                                       "source": source, "minutes": minutes}, indent=1))
    return metrics, domains, source, minutes


def markdown_table(rows: dict[str, list[Run]]) -> str:
    """One row per config; cells over its runs (one per seed)."""
    _, domains, source, _ = next(iter(rows.values()))[0]
    header = [f"{d} (source)" if d == source else d for d in domains]
    lines = ["| config | " + " | ".join(header) + " | mean over targets | seeds | minutes per run |",
             "|---|" + "---|" * (len(domains) + 3)]
    for name, runs in rows.items():
        cells = [mean_std([100 * metrics[f"test/{d}/mIoU"] for metrics, *_ in runs]) for d in domains]
        mean = mean_std([100 * metrics["test/mIoU_mean"] for metrics, *_ in runs])
        minutes = statistics.mean(run[3] for run in runs)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{mean}** | {len(runs)} | {minutes:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="config files or folders of them")
    parser.add_argument("--out", type=Path, help="write the table (with the command) to this Markdown file")
    parser.add_argument("--root", type=Path, default=Path("runs/compare"), help="run folders")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (1 is faster on a CPU shared with other jobs)")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="training seeds, one run per config and seed (default: the config's own)")
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    rows: dict[str, list[Run]] = {}
    for seed in args.seeds or [None]:
        seed_overrides = overrides if seed is None else [f"--seed_everything={seed}", *overrides]
        root = args.root if seed is None else args.root / f"seed{seed}"
        for config in config_files(args.configs):
            rows.setdefault(config.stem, []).append(fit_and_test(config, seed_overrides, root))
            print(markdown_table(rows), flush=True)
    table = markdown_table(rows)
    command = "python benchmarks/compare_methods.py " + shlex.join(sys.argv[1:])
    print(table)
    if args.out:
        write_results(args.out, f"Command:\n\n    {command}\n\n{table}")


def write_results(path: Path, section: str) -> None:
    """Replace the text between the results markers of ``path`` (or create the file)."""
    start, end = MARKERS
    text = path.read_text() if path.exists() else f"{start}\n{end}\n"
    if start not in text or end not in text:
        text = text.rstrip() + f"\n\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{start}\n{section}\n{end}{tail}")


if __name__ == "__main__":
    main()
