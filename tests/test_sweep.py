"""`deft-lightning sweep`: wandb sweep files expanded and run locally."""

import csv
import itertools
import json
import math
import warnings

import pytest
import yaml
from PIL import Image
from conftest import TINY_DATA, TINY_NET

from deft_lightning.sweep import SweepError, agent_command, expand, load_sweep, main, swept_names
from test_cli import ROOT, deft_lightning

SWEEPS = sorted((ROOT / "configs/sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_shipped_sweep_expands_into_wandbs_grid_and_commands(path):
    """Grid: every combination once, parameters in name order with the last varying fastest
    (wandb's grid_search_next_runs); each point's command is the one wandb's agent builds."""
    from wandb.sdk.launch.sweeps import utils as wandb_sweep_utils

    spec = load_sweep(path)
    points = expand(spec)
    names = sorted(spec["parameters"])
    choices = [spec["parameters"][n]["values"] if "values" in spec["parameters"][n] else [spec["parameters"][n]["value"]]
               for n in names]
    assert len(points) == math.prod(len(c) for c in choices) > 1
    assert points == [dict(zip(names, combo)) for combo in itertools.product(*choices)]
    assert len({json.dumps(p, sort_keys=True) for p in points}) == len(points)
    for values in (points[0], points[-1]):
        wandb_vars = wandb_sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
        wandb_vars.update(env=["/usr/bin/env"], interpreter=["python"], program=[spec["program"]])
        expected = [part for chunk in wandb_sweep_utils.create_sweep_command(spec["command"])
                    for part in (wandb_vars[chunk[2:-1]] if chunk.startswith("${") else [chunk])]
        assert agent_command(spec, values) == expected


def test_nested_parameters_reach_the_command_as_wandbs_agent_passes_them(tmp_path):
    """wandb's nested ``parameters``: expanded like dotted names, passed as one argument per
    top-level key holding the nested mapping (what the agent's ``${args}`` gives for a nested
    run config); jsonargparse merges it into the config's model (test_grid_sweep_* runs one)."""
    from wandb.sdk.launch.sweeps import utils as wandb_sweep_utils

    nested = {"init_args": {"parameters": {"lr": {"values": [0.1, 0.01]}, "beta_encoder": {"value": 0.99}}}}
    path = tmp_path / "nested.yaml"
    path.write_text(yaml.safe_dump({"program": "deft-lightning", "method": "grid", "parameters": {
        "model": {"parameters": nested}, "trainer.max_steps": {"values": [5, 10]}},
        "command": ["${env}", "${program}", "fit", "${args}"]}))
    spec = load_sweep(path)
    points = expand(spec)
    assert swept_names(spec) == ["model.init_args.lr", "trainer.max_steps"]
    assert [(p["model.init_args.lr"], p["trainer.max_steps"]) for p in points] == [(0.1, 5), (0.1, 10), (0.01, 5), (0.01, 10)]
    for values in points:
        run_config = {"model": {"init_args": {"beta_encoder": 0.99, "lr": values["model.init_args.lr"]}},
                      "trainer.max_steps": values["trainer.max_steps"]}
        wandb_args = wandb_sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in run_config.items()}})
        assert agent_command(spec, values) == ["/usr/bin/env", "deft-lightning", "fit", *wandb_args["args"]]
    path.write_text(yaml.safe_dump({"method": "grid", "parameters": {
        "model": {"parameters": nested}, "model.init_args.lr": {"values": [1.0]}}}))
    with pytest.raises(SweepError, match="'model.init_args.lr' is given twice"):
        load_sweep(path)


RANDOM_SWEEP = {
    "method": "random",
    "metric": {"name": "val/mIoU_source", "goal": "maximize"},
    "parameters": {
        "a.constant": {"value": 3},
        "a.categorical": {"values": ["x", "y", "z"]},
        "a.weighted": {"values": [1, 2], "probabilities": [0.0, 1.0]},
        "a.int": {"min": 2, "max": 5},
        "a.uniform": {"min": 0.5, "max": 1.5},
        "a.q_uniform": {"distribution": "q_uniform", "min": 0, "max": 10, "q": 2},
        "a.log_exponents": {"distribution": "log_uniform", "min": -4.0, "max": -1.0},
        "a.log_values": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
        "a.inv_log_values": {"distribution": "inv_log_uniform_values", "min": 0.9, "max": 0.9999},
        "a.normal": {"distribution": "normal", "mu": 5.0, "sigma": 0.001},
        "a.beta": {"distribution": "beta", "a": 2, "b": 2},
    },
}


def test_random_sweep_is_seeded_and_within_its_distributions(tmp_path):
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump(RANDOM_SWEEP))
    spec = load_sweep(path)
    points = expand(spec, count=40, seed=3)
    assert points == expand(spec, count=40, seed=3) and points != expand(spec, count=40, seed=4)
    assert len(points) == 40
    for p in points:
        assert p["a.constant"] == 3 and p["a.categorical"] in ("x", "y", "z") and p["a.weighted"] == 2
        assert p["a.int"] in range(2, 6) and 0.5 <= p["a.uniform"] <= 1.5
        assert p["a.q_uniform"] in (0, 2, 4, 6, 8, 10) and isinstance(p["a.q_uniform"], int)
        assert math.exp(-4) <= p["a.log_exponents"] <= math.exp(-1) and 1e-4 <= p["a.log_values"] <= 1e-1
        assert 0.9 <= p["a.inv_log_values"] <= 0.9999 and abs(p["a.normal"] - 5) < 0.01 and 0 <= p["a.beta"] <= 1
    assert {p["a.categorical"] for p in points} == {"x", "y", "z"} and len({p["a.int"] for p in points}) == 4
    assert swept_names(spec) == sorted(set(RANDOM_SWEEP["parameters"]) - {"a.constant"})
    with pytest.raises(SweepError, match="--count"):
        expand(spec)


@pytest.mark.parametrize("change, message", [
    ({"method": "bayes"}, "wandb agent"),
    ({"method": "hyperband"}, "method must be"),
    ({"parameters": {"lr": {"distribution": "uniform", "min": 0.1, "max": 0.01}}}, "min 0.1 is not less than max"),
    ({"parameters": {"lr": {"distribution": "cauchy"}}}, "unknown distribution 'cauchy'"),
    ({"method": "grid", "parameters": {"lr": {"min": 0.1, "max": 1.0}}}, "a grid takes only"),
    ({"parameters": {"lr": {"values": 0.1}}}, "'values' must be a list, got 0.1"),  # was a TypeError traceback
    # PyYAML reads 1e-4 as text; '1e-4' < '1e-2' is False, so it was "min 1e-4 is not less than max 1e-2".
    ({"parameters": {"lr": {"distribution": "log_uniform_values", "min": "1e-4", "max": "1e-2"}}},
     "min '1e-4' is text, not a number"),
])
def test_sweep_file_errors_name_the_problem(tmp_path, change, message, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**RANDOM_SWEEP, **change}))
    with pytest.raises(SystemExit, match=message) as error:
        main([str(path), "--count", "2", "--dry_run", "true"])
    assert str(path) in str(error.value)


def test_a_sweep_file_that_is_not_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: grid\nparameters:\n  lr:\n    values: [0.1, 0.2\n")
    with pytest.raises(SystemExit, match=f"{path}: not valid YAML at line 5, column 1"):
        main([str(path), "--dry_run", "true"])


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    """A 2-point lr grid on the joint config, tiny net and data, 2 points at once, each tested."""
    root = tmp_path_factory.mktemp("sweep")
    tiny = {"model": {"init_args": TINY_NET},
            "data": {"init_args": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_DATA.items()}},
            "trainer": {"max_steps": 2, "val_check_interval": 2, "num_sanity_val_steps": 0,
                        "enable_progress_bar": False, "enable_model_summary": False}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    sweep = {"program": "deft-lightning", "method": "grid", "metric": {"name": "val/mIoU_source", "goal": "maximize"},
             "parameters": {"model.init_args.lr": {"values": [0.05, 0.0001]},  # one dotted, one nested
                            "model": {"parameters": {"init_args": {"parameters": {"momentum": {"value": 0.7}}}}}},
             "command": ["${env}", "${program}", "fit", "--config", str(ROOT / "configs/joint.yaml"),
                         "--config", "tiny.yaml", "${args}"]}
    (root / "grid.yaml").write_text(yaml.safe_dump(sweep))
    args = ("sweep", "grid.yaml", "--parallel", "2", "--test", "true", "--root", "runs/grid")
    first = deft_lightning(*args, cwd=root)
    first.table = (root / "runs/grid/sweep.csv").read_text() if first.returncode == 0 else None
    second = deft_lightning(*args, cwd=root)
    return root / "runs/grid", first, second


def test_grid_sweep_runs_every_point_and_ranks_them_by_the_metric(grid_sweep):
    folder, first, _ = grid_sweep
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rows = list(csv.DictReader(open(folder / "sweep.csv")))
    assert sorted(r["point"] for r in rows) == ["lr=0.0001", "lr=0.05"]
    assert all(r["status"] == "done" for r in rows)
    scores = [float(r["val/mIoU_source"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert "lr=0.05" in (folder / "sweep.md").read_text() and "lr=0.0001" in first.stdout
    for row in rows:
        summary = json.loads((folder / row["point"] / "summary.json").read_text())
        assert summary["fit"]["metrics"]["val/mIoU_source"] == pytest.approx(float(row["val/mIoU_source"]))
        assert 0 <= summary["test"]["metrics"]["test/mIoU_mean"] <= 1 and summary["fit"]["global_step"] == 2
        (results,) = (folder / row["point"]).rglob("test_results.json")  # `deft-lightning test` wrote it
        assert (results.parent / "test_iou.md").exists()
        for domain in ("clear", "night", "fog"):  # a confusion-matrix PNG per domain beside test_iou.md
            with Image.open(results.parent / f"confusion_{domain}.png") as png:
                assert png.format == "PNG" and min(png.size) > 200
        config = yaml.safe_load(next((folder / row["point"]).rglob("config.yaml")).read_text())
        assert config["model"]["init_args"]["lr"] == float(row["model.init_args.lr"])
        assert config["model"]["init_args"]["momentum"] == 0.7  # the nested parameter, merged (default 0.9)


def test_grid_sweep_rerun_keeps_finished_points(grid_sweep):
    folder, first, second = grid_sweep
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("finished before, kept") == 2 and "running" not in second.stdout
    assert (folder / "sweep.csv").read_text() == first.table


def test_report_on_the_two_finished_points(grid_sweep):
    """`report` on the sweep folder: both points in the table and CSV, the three figures as PNGs
    of the size the figure functions set (constrained layout: figsize x 100 dpi)."""
    from deft_lightning.plots import bars_width
    from deft_lightning.report import report

    folder, first, _ = grid_sweep
    assert first.returncode == 0
    result = report(run_dirs=[str(folder)])
    rows = list(csv.DictReader(open(folder / "report/report.csv")))
    assert [r["run"] for r in rows] == [r["point"] for r in csv.DictReader(open(folder / "sweep.csv"))]
    assert {r["model.init_args.lr"] for r in rows} == {"0.05", "0.0001"} and all(r["stage"] == "test" for r in rows)
    for row in rows:
        summary = json.loads((folder / row["run"] / "summary.json").read_text())["test"]["metrics"]
        assert float(row["mean_over_targets"]) == pytest.approx(100 * summary["test/mIoU_mean"], abs=1e-3)
        assert float(row["clear_source"]) == pytest.approx(100 * summary["test/mIoU_source"], abs=1e-3)
    assert "| lr=0.05 | 0.05 | 0 | test |" in (folder / "report/report.md").read_text()
    sizes = {}
    for name in ("per_domain_miou", "per_class_iou", "metric_vs_parameters"):
        with Image.open(folder / "report" / f"{name}.png") as png:
            png.load()
            sizes[name] = png.size
    assert sizes["per_domain_miou"] == (round(100 * bars_width(3, 2)), 400)  # 3 domains, 2 runs
    assert sizes["metric_vs_parameters"] == (420, 340)  # one swept parameter: one panel
    assert sizes["per_class_iou"][1] > 19 * 28  # a row per class
    assert [f.name for f in result.files][:2] == ["report.md", "report.csv"]


@pytest.mark.parametrize("metric", ["val/mIoU_mean", "val/night/mIoU", "test/mIoU_mean"])
def test_a_sweep_selecting_on_target_data_warns_and_the_shipped_sweeps_do_not(tmp_path, metric):
    path = tmp_path / "target.yaml"
    path.write_text(yaml.safe_dump({**RANDOM_SWEEP, "metric": {"name": metric, "goal": "maximize"}}))
    with pytest.warns(UserWarning, match=f"selects on {metric}, which can be target-domain data"):
        load_sweep(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for shipped in sorted((ROOT / "configs/sweeps").glob("*.yaml")):
            load_sweep(shipped)
