"""`deft-lightning report`: runs grouped by config, seeds as mean ± std, swept keys found."""

import csv
import json
import statistics

import pytest
import torch
import yaml

from deft_lightning.report import main, mean_std, report
from deft_lightning.results import write_test_results


def fake_run(folder, lr, seed, accuracy, results="lightning_logs/version_1"):
    """A finished run: config.yaml and test results (in ``folder/results``) whose confusion
    matrices give known IoUs."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "seed_everything": seed, "trainer": {"default_root_dir": str(folder), "max_steps": 10},
        "model": {"class_path": "deft_lightning.DeFT", "init_args": {"lr": lr, "beta_encoder": 0.999}}}))
    confusions = {}
    for domain, scale in (("clear", 1.0), ("night", 0.5), ("fog", 0.8)):
        correct = int(100 * accuracy * scale)
        confusion = torch.zeros(19, 19, dtype=torch.long)
        confusion[0, 0], confusion[0, 1], confusion[1, 1] = correct, 100 - correct, 100
        confusions[domain] = confusion
    write_test_results(folder / results, confusions, "clear")


def miou(accuracy, scale):  # classes 0 and 1 of fake_run's confusion matrix
    correct = int(100 * accuracy * scale)
    return 100 * (correct / 100 + 100 / (200 - correct)) / 2


def test_seeds_are_one_row_with_mean_and_std(tmp_path):
    fake_run(tmp_path / "a0", 0.01, 0, 0.9)
    fake_run(tmp_path / "a1", 0.01, 1, 0.7)
    fake_run(tmp_path / "b0", 0.1, 0, 0.5)
    result = report(run_dirs=[str(tmp_path / "a0"), str(tmp_path / "a1"), str(tmp_path / "b0")],
                    out=str(tmp_path / "report"))
    rows = {r["run"]: r for r in csv.DictReader(open(tmp_path / "report/report.csv"))}
    assert list(rows) == ["lr=0.01", "lr=0.1"]  # beta_encoder is the same everywhere: not swept
    a, b = rows["lr=0.01"], rows["lr=0.1"]
    assert a["seeds"] == "0 1" and b["seeds"] == "0"
    night = [miou(0.9, 0.5), miou(0.7, 0.5)]
    assert float(a["night"]) == pytest.approx(statistics.mean(night), abs=1e-3)
    assert float(a["night_std"]) == pytest.approx(statistics.stdev(night), abs=1e-3)
    targets = [(miou(acc, 0.5) + miou(acc, 0.8)) / 2 for acc in (0.9, 0.7)]
    assert float(a["mean_over_targets"]) == pytest.approx(statistics.mean(targets), abs=1e-3)
    assert float(b["clear_source"]) == pytest.approx(miou(0.5, 1.0), abs=1e-3) and b["clear_source_std"] == ""
    assert f"**{mean_std(targets)}**" in result.table
    assert (tmp_path / "report/per_class_iou.png").is_file() and (tmp_path / "report/metric_vs_parameters.png").is_file()


def test_a_folder_without_runs_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no run found"):
        main([str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="does not exist"):
        main([str(tmp_path / "missing")])


def test_a_folder_of_run_folders_is_one_row_per_run_with_aligned_cells(tmp_path):
    """runs/<name>/version_<N>/test/test_results.json: each run folder its own row (they used to
    be one run showing only the newest results), named by its path when the configs differ only
    in a list (nothing swept), each cell under its header (the row had one cell too many)."""
    for name, accuracy in (("city", 0.9), ("gta", 0.5)):
        folder = tmp_path / "runs" / name / "version_0"
        fake_run(folder, 0.01, 0, accuracy, results="test")
        config = yaml.safe_load((folder / "config.yaml").read_text())
        (folder / "config.yaml").write_text(yaml.safe_dump({**config, "data": {"targets": [name]}}))
    result = report(run_dirs=[str(tmp_path / "runs")], out=str(tmp_path / "report"))
    header, _, *rows = result.table.splitlines()
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    cells = {row.strip("|").split("|")[0].strip(): [cell.strip() for cell in row.strip("|").split("|")] for row in rows}
    assert sorted(cells) == ["city/version_0", "gta/version_0"]
    for name, accuracy in (("city", 0.9), ("gta", 0.5)):
        assert len(cells[f"{name}/version_0"]) == len(columns)
        row = dict(zip(columns, cells[f"{name}/version_0"]))
        assert row["stage"] == "test" and row["clear (source)"] == f"{miou(accuracy, 1.0):.1f}"


def test_a_net_with_more_outputs_than_the_19_classes_gets_its_results_written(tmp_path):
    """num_classes=20 is accepted (the data's train ids fit in it): a pixel predicted as class 19
    is a row of the table and of test_results.json, named, instead of a crash at the end of test."""
    from deft_lightning.metrics import iou_per_class
    from deft_lightning.results import read_test_results
    from deft_lightning.tasks.base import format_iou_table

    confusion = torch.zeros(20, 20, dtype=torch.long)
    confusion[0, 0], confusion[1, 19] = 5, 3
    write_test_results(tmp_path, {"fog": confusion}, None)
    results = read_test_results(tmp_path / "test_results.json")
    assert results["classes"][18:] == ["bicycle", "class 19"] and len(results["domains"]["fog"]["iou"]) == 20
    assert (tmp_path / "confusion_fog.png").is_file()
    table = format_iou_table({"fog": iou_per_class(confusion)})
    assert "| class 19 | 0.0 |" in table and "| **mIoU** | 33.3 |" in table
