"""``deft-lightning report``: many runs gathered into one table and a few figures.

    deft-lightning report runs/sweeps/deft_beta                 # a sweep folder: its points
    deft-lightning report runs/a runs/b runs/c --out runs/report

or from Python / a notebook: ``report(run_dirs=["runs/a", "runs/b"], out="runs/report")``.

A run is a folder with the ``summary.json`` that ``deft-lightning sweep`` writes (through the
:class:`~deft_lightning.callbacks.RunSummary` callback), or with a ``test_results.json`` that
``deft-lightning test`` writes beside ``test_iou.md`` anywhere below it; a sweep folder stands for
its points, a folder of such runs for its runs. Per run it reads the newest test results (per-class
IoU per domain) or, without a test, the last validation's per-domain mIoU, and the run's
``config.yaml``. Runs whose configs differ only in ``seed_everything`` (and output paths) are one
row, each cell ``mean ± std`` over the seeds (sample std); the config keys that differ between
rows are the swept hyperparameters, shown as columns. Written to ``out``: ``report.md`` and
``report.csv`` (per-domain mIoU, source mIoU, mean over the target domains, the swept values,
seeds), ``per_domain_miou.png`` (grouped bars), ``per_class_iou.png`` (heatmaps, runs with test
results) and, when something was swept, ``metric_vs_parameters.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from jsonargparse import auto_cli

from .plots import grouped_bars, iou_heatmaps, metric_vs_parameters, save
from .results import RESULTS_FILE, read_test_results
from .run_folder import STAGES, VERSION

#: Config keys that never make runs different (seeds are averaged over, paths are outputs).
IGNORED_KEY_PARTS = ("seed_everything", "ckpt_path", "default_root_dir", "save_dir", "dirpath", "output_dir",
                     "version", "trainer.callbacks", "trainer.logger")


def mean_std(values: list[float]) -> str:
    """``mean`` for one value, ``mean ± sample std`` for several."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


@dataclass
class Run:
    """One run's per-domain results (fractions in [0, 1]) and its flattened config."""

    folder: Path
    domains: dict[str, float]
    source: str | None
    stage: str  # "test" or "val"
    config: dict[str, Any]
    per_class: dict[str, np.ndarray] | None = None
    classes: list[str] | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> Any:
        return self.config.get("seed_everything")

    @property
    def target_mean(self) -> float:
        targets = [v for d, v in self.domains.items() if d != self.source]
        return sum(targets) / len(targets) if targets else math.nan


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model.init_args.lr": 0.01, ...}``; lists are kept whole."""
    if not isinstance(config, dict):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def find_runs(folder: Path) -> list[Path]:
    """The runs a folder stands for (see the module docstring)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"run folder {folder} does not exist")
    sweep_file = folder / "sweep.json"
    if sweep_file.is_file():
        return [folder / name for name in json.loads(sweep_file.read_text())["points"]
                if (folder / name / "summary.json").is_file()]
    if (folder / "summary.json").is_file():
        return [folder]
    children = [c for c in sorted(folder.iterdir()) if c.is_dir()
                and ((c / "summary.json").is_file() or (c / "sweep.json").is_file())]
    if children:
        return [run for child in children for run in find_runs(child)]
    results = list(folder.rglob(RESULTS_FILE))
    # Several run folders of the library's layout (runs/<name>/version_<N>/test/...): each a run.
    run_dirs = sorted({f.parent.parent for f in results if f.parent.name in STAGES and VERSION.match(f.parent.parent.name)})
    if len(run_dirs) > 1:
        return run_dirs
    if results:
        return [folder]
    raise FileNotFoundError(f"{folder}: no run found (expected summary.json from `deft-lightning sweep`, or "
                            f"{RESULTS_FILE} from `deft-lightning test` below it)")


def read_run(folder: Path) -> Run:
    summary_file = folder / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    fit_dir = Path(summary.get("fit", {}).get("log_dir") or folder)
    configs = sorted(folder.rglob("config.yaml"), key=lambda p: p.stat().st_mtime)
    config_file = fit_dir / "config.yaml" if (fit_dir / "config.yaml").is_file() else (configs[0] if configs else None)
    config = flatten(yaml.safe_load(config_file.read_text())) if config_file else {}
    results_files = sorted(folder.rglob(RESULTS_FILE), key=lambda p: p.stat().st_mtime)
    if results_files:
        results = read_test_results(results_files[-1])
        domains = {d: entry["mIoU"] for d, entry in results["domains"].items()}
        per_class = {d: entry["iou"] for d, entry in results["domains"].items()}
        return Run(folder, domains, results["source"], "test", config, per_class, results["classes"], summary)
    fit = summary.get("fit", {})
    metrics = fit.get("metrics", {})
    names = fit.get("domains") or [k.split("/")[1] for k in metrics if k.startswith("val/") and k.endswith("/mIoU")]
    domains = {d: metrics[f"val/{d}/mIoU"] for d in names if metrics.get(f"val/{d}/mIoU") is not None}
    if not domains:
        raise ValueError(f"{folder}: neither {RESULTS_FILE} nor validation mIoU in summary.json "
                         "(did the run validate? set trainer.val_check_interval)")
    return Run(folder, domains, fit.get("source_domain"), "val", config, summary=summary)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not any(part in k for part in IGNORED_KEY_PARTS)}


@dataclass
class Report:
    """What :func:`report` wrote, for a notebook to show."""

    table: str
    rows: list[dict[str, Any]]
    files: list[Path]


def report(*, run_dirs: list[str], out: str | None = None) -> Report:
    """Gather runs into one table (Markdown and CSV) and PNG figures.

    Args:
        run_dirs: run folders, sweep folders, or folders of runs.
        out: output folder (default: ``<run_dir>/report`` for one folder, else ``runs/report``).
    """
    if not run_dirs:
        raise ValueError("give at least one run folder")
    folders = [run for d in run_dirs for run in find_runs(Path(d))]
    runs = [read_run(f) for f in folders]
    sweep_files = [Path(d) / "sweep.json" for d in run_dirs if (Path(d) / "sweep.json").is_file()]
    sweep_metric = json.loads(sweep_files[0].read_text()) if len(sweep_files) == 1 == len(run_dirs) else None
    out_dir = Path(out or (Path(run_dirs[0]) / "report" if len(run_dirs) == 1 else "runs/report"))

    # Rows: runs whose configs agree apart from seeds and paths.
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(json.dumps(_comparable(run.config), sort_keys=True, default=str), []).append(run)
    keys = sorted({k for run in runs for k in _comparable(run.config)})
    swept = [k for k in keys if len({json.dumps(g[0].config.get(k), default=str) for g in groups.values()}) > 1
             and all(not isinstance(g[0].config.get(k), (list, dict)) for g in groups.values())]
    short = {k: k.rsplit(".", 1)[-1] for k in swept}
    if len(set(short.values())) < len(short):
        short = {k: k for k in swept}

    names = [run.folder.name for run in runs]
    common = Path(os.path.commonpath([run.folder.resolve() for run in runs])) if len(set(names)) < len(names) else None

    def row_name(group: list[Run]) -> str:
        if swept:
            return ",".join(f"{short[k]}={group[0].config.get(k)}" for k in swept)
        folder = group[0].folder
        return folder.resolve().relative_to(common).as_posix() if common else folder.name

    named = {row_name(g): g for g in groups.values()}
    if sweep_metric:  # a sweep's points, best first by its metric (its last logged value)
        def score(group: list[Run]) -> float:
            values = [r.summary.get("fit", {}).get("metrics", {}).get(sweep_metric["metric"]) for r in group]
            values = [v for v in values if v is not None]
            return statistics.mean(values) if values else math.nan
        reverse = sweep_metric.get("goal") == "maximize"
        named = dict(sorted(named.items(), key=lambda item: (math.isnan(score(item[1])),
                                                             -score(item[1]) if reverse else score(item[1]))))
    source = runs[0].source
    domains = list(dict.fromkeys(d for run in runs for d in run.domains))
    targets = [d for d in domains if d != source]

    def values(group: list[Run], domain: str | None) -> list[float]:
        if domain is None:
            return [100 * r.target_mean for r in group]
        return [100 * r.domains[domain] for r in group if domain in r.domains]

    columns = [*(source and [source] or []), *targets, None]  # None: mean over targets
    header = ["run", *(short[k] for k in swept), "seeds", "stage",
              *(f"{d} (source)" if d == source else d for d in columns[:-1]), "mean over targets"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for name, group in named.items():
        cells = [mean_std(values(group, d)) if values(group, d) else "-" for d in columns]
        cells[-1] = f"**{cells[-1]}**"
        seeds = sorted({str(r.seed) for r in group})
        lines.append("| " + " | ".join([name, *(str(group[0].config.get(k)) for k in swept), ", ".join(seeds),
                                         group[0].stage, *cells]) + " |")
        row: dict[str, Any] = {"run": name, **{k: group[0].config.get(k) for k in swept},
                               "seeds": " ".join(seeds), "stage": group[0].stage}
        for domain in columns:
            label = "mean_over_targets" if domain is None else (f"{domain}_source" if domain == source else domain)
            v = values(group, domain)
            row[label] = round(statistics.mean(v), 3) if v else None
            row[f"{label}_std"] = round(statistics.stdev(v), 3) if len(v) > 1 else None
        rows.append(row)
    table = "\n".join(lines)

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    bars = {name: {d: statistics.mean(values(g, d)) for d in domains if values(g, d)} for name, g in named.items()}
    errors = {name: {d: statistics.stdev(values(g, d)) for d in domains if len(values(g, d)) > 1}
              for name, g in named.items()}
    files.append(save(grouped_bars(bars, errors, title="mIoU per domain (mean ± std over seeds)"),
                      out_dir / "per_domain_miou.png"))
    with_classes = {name: g for name, g in named.items() if all(r.per_class for r in g)}
    if with_classes:
        first = next(iter(with_classes.values()))[0]
        with warnings.catch_warnings():  # a class absent from every seed stays NaN (blank)
            warnings.simplefilter("ignore", RuntimeWarning)
            tables = {name: 100 * np.stack([np.nanmean(np.stack([r.per_class[d] for r in g]), 0) for d in domains], 1)
                      for name, g in with_classes.items()}
        present = [i for i in range(len(first.classes)) if any(not np.isnan(t[i]).all() for t in tables.values())]
        files.append(save(iou_heatmaps({n: t[present] for n, t in tables.items()}, [first.classes[i] for i in present],
                                       domains), out_dir / "per_class_iou.png"))
    if swept:
        points = [{**{k: g[0].config.get(k) for k in swept}, "source mIoU": statistics.mean(values(g, source))
                   if source and values(g, source) else None, "mean over targets": statistics.mean(values(g, None))}
                  for g in named.values()]
        files.append(save(metric_vs_parameters(points, swept, ["source mIoU", "mean over targets"]),
                          out_dir / "metric_vs_parameters.png"))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    (out_dir / "report.csv").write_text(buffer.getvalue())
    figures = "\n".join(f"![{f.stem}]({f.name})" for f in files)
    stages = {r.stage for r in runs}
    note = ("test results (`test_results.json`)" if stages == {"test"} else
            "the last validation (`summary.json`)" if stages == {"val"} else "test results where present, else the last validation")
    (out_dir / "report.md").write_text(
        f"# Report: {len(runs)} runs in {len(rows)} rows\n\nmIoU (%) per domain from {note}; "
        f"cells are mean ± sample std over the seeds of a row.\n\n{table}\n\n{figures}\n")
    files[:0] = [out_dir / "report.md", out_dir / "report.csv"]
    print(f"{table}\n\nwritten: {', '.join(str(f) for f in files)}")
    return Report(table, rows, files)


def main(argv: list[str]) -> None:
    """``deft-lightning report RUN_DIR... [--out DIR]``."""
    run_dirs = []
    while argv and not argv[0].startswith("-"):
        run_dirs.append(argv.pop(0))
    try:
        auto_cli(report, args=[f"--run_dirs={json.dumps(run_dirs)}", *argv] if run_dirs else argv)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"deft-lightning report: {error}") from None
