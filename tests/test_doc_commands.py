"""The commands that README.md, docs/*.md and the configs' header comments tell users to type.

Every documented `deft-lightning fit|validate|test|predict` line parses in the library's CLI, and
the lines no other test runs are run here as written, through the console script, in a folder of
their own with `configs/` linked in and a tiny net and data appended: `make demo`, `check-data` on
the data presets, the DAFT Table 5 overlays, the DeFT final-model ablation's `test` and `report`
over several run folders; and README's Layout is the package's tree. The other documented
commands run in test_cli.py, test_checkpoint_cli.py, test_run_folder.py, test_merge_cli.py,
test_workflow_docs.py, test_data_presets.py, test_fishertune.py, test_precision.py, test_resume.py,
test_sweep.py, test_wandb.py and test_multinode.py.
"""

import csv
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import TINY_DATA, TINY_NET
from fake_datasets import make_data_root
from test_cli import ROOT, deft_lightning

SUBCOMMANDS = "fit|validate|test|predict|export|merge|sweep|report|check-data"


def _lines(path: Path) -> list[str]:
    """A Markdown file's lines, or a config's header comment (without the ``#``)."""
    if path.suffix != ".yaml":
        return path.read_text().splitlines()
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:])
    return header


def documented_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for each `deft-lightning <verb> ...` in the docs and config headers, with
    its ``\\`` continuations joined and any trailing ``# comment`` dropped."""
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").rglob("*.yaml"))]
    found = []
    for path in paths:
        lines = _lines(path)
        for number, line in enumerate(lines):
            for match in re.finditer(rf"(?:^|`|\s)(deft-lightning (?:{SUBCOMMANDS})\b[^`#\n]*)", line):
                command, following = match.group(1).rstrip(), number
                while command.endswith("\\") and following + 1 < len(lines):
                    following += 1
                    command = command[:-1].rstrip() + " " + lines[following].split("  #")[0].strip()
                found.append((f"{path.relative_to(ROOT)}:{number + 1}", command.strip()))
    return found


def documented(where: str, prefix: str) -> str:
    """The one command in file ``where`` that starts with ``prefix``."""
    (command,) = [c for w, c in documented_commands() if w.startswith(where + ":") and c.startswith(prefix)]
    return command


# Values for the shell variables of the documented loops (docs/merging.md, docs/fishertune.md).
LOOP_VALUES = {"$method": "joint", "$seed": "0", "$f": "0.05", "$lr": "0.01"}
# Documented lines that cannot be parsed here, and where they are run instead.
NOT_HERE = {
    "configs/trainer/multinode.yaml": "GPU nodes: tests/test_multinode.py (slow) runs it on CPU with gloo",
    "/path/to/": "a local DINOv2 file: test_fishertune.py loads timm's tiny ViT from a file the same way",
}


def trainer_commands() -> list[tuple[str, list[str]]]:
    """The documented fit/validate/test/predict lines as arguments of a run=False parse: optional
    ``[--config ...]`` taken, loop variables filled in, ``--ckpt_path`` (a subcommand argument) left out."""
    commands = {}
    for where, command in documented_commands():
        args = shlex.split(command.replace("[--config", "--config").replace(".yaml]", ".yaml"))
        if args[1] not in ("fit", "validate", "test", "predict") or len(args) == 2 or "..." in args:  # prose
            continue
        for name, value in LOOP_VALUES.items():
            args = [a.replace(name, value) for a in args]
        kept, skip = [], False
        for arg in args[2:]:
            if skip or arg == "--ckpt_path":
                skip = arg == "--ckpt_path"
                continue
            kept.append(arg)
        commands.setdefault(tuple(kept), where)
    (demo,) = re.findall(r"^CONFIGS := (.*)$", (ROOT / "Makefile").read_text(), flags=re.M)  # `make demo`
    commands.setdefault(tuple(shlex.split(demo)), "Makefile:CONFIGS")
    return [(where, list(args)) for args, where in commands.items()]


TRAINER_COMMANDS = trainer_commands()


@pytest.fixture
def in_copy(tmp_path, monkeypatch):
    """An empty working folder with the repository's configs/ linked in (doc paths are relative)."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli_args(model: dict, data: dict) -> list[str]:
    def value(v):
        return v if isinstance(v, str) else json.dumps(list(v) if isinstance(v, tuple) else v)

    return [*(f"--model.init_args.{k}={value(v)}" for k, v in model.items()),
            *(f"--data.init_args.{k}={value(v)}" for k, v in data.items())]


QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
TINY = [*cli_args(TINY_NET, TINY_DATA), *QUIET]


def run(command: str, cwd: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A documented `deft-lightning ...` line through the console script, ``extra`` appended."""
    args = shlex.split(command)
    assert args[0] == "deft-lightning", command
    result = deft_lightning(*args[1:], *extra, cwd=cwd, env=env)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def test_the_docs_and_headers_show_commands_of_every_kind():
    verbs = {command.split()[1] for _, command in documented_commands()}
    assert verbs == set(SUBCOMMANDS.split("|")), verbs
    assert len(TRAINER_COMMANDS) >= 25


@pytest.mark.parametrize("where,args", TRAINER_COMMANDS, ids=[where for where, _ in TRAINER_COMMANDS])
def test_documented_command_parses(where, args, in_copy):
    """Each documented fit/validate/test/predict line builds its model and data (no step runs):
    every config file it names exists and every key it sets is one the CLI knows."""
    from deft_lightning.cli import lightning_cli

    reason = next((why for marker, why in NOT_HERE.items() if marker in " ".join(args)), None)
    if reason:
        pytest.skip(reason)
    cli = lightning_cli([*args, "--trainer.logger=false"], run=False)
    assert cli.model is not None and cli.datamodule is not None


@pytest.mark.slow  # three processes: about a minute on 2 shared cores (its configs parse in the fast suite)
def test_make_demo_runs_as_the_readme_says(in_copy):
    """`make demo` (README): the Makefile's fit, test and predict lines, read with `make -n`, with a
    tiny net and data: one run folder, the per-domain table of every synthetic domain, overlays
    and train-id PNGs of every domain in predict/predictions/<domain>/."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    dry = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), "demo"], capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert dry.returncode == 0, dry.stderr
    lines = [line.split("/bin/", 1)[1] for line in dry.stdout.splitlines() if "/bin/deft-lightning " in line]
    assert [line.split()[1] for line in lines] == ["fit", "test", "predict"], dry.stdout
    data = {k: v for k, v in TINY_DATA.items() if k != "synthetic_targets"}  # every domain, as the demo
    tiny = [*cli_args(TINY_NET, {**data, "synthetic_val_size": 2}), *QUIET, "--trainer.max_steps=2"]
    outputs = [run(line, in_copy, *tiny) for line in lines]
    run_dir = in_copy / "runs/demo/version_0"
    for result in outputs:
        assert "Run folder: runs/demo/version_0" in result.stdout
    domains = ["clear", "dusk", "fog", "night", "snow", "desert"]
    header = (run_dir / "test/test_iou.md").read_text().splitlines()[0]
    assert [cell.strip() for cell in header.strip("|").split("|")][1:7] == ["clear (source)", *domains[1:]], header
    for domain in domains:
        pngs = sorted(p.name for p in (run_dir / "predict/predictions" / domain).iterdir())
        assert len(pngs) == 2 * 2, (domain, pngs)  # two images, each an overlay and a train-id PNG


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_data_root(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("preset", ["cityscapes_to_acdc", "cityscapes_to_bdd_synthia_gtav",
                                    "gtav_to_cityscapes_bdd_mapillary"])
def test_check_data_on_a_preset(preset, data_root, in_copy):
    """The presets' header line with `DEFT_DATA_ROOT` set; the GTAV protocol's as docs/datasets.md
    writes it, with `--data_root`. Every dataset the preset names is read and counted."""
    config = f"configs/data/{preset}.yaml"
    if preset.startswith("gtav"):
        command = documented("docs/datasets.md", f"deft-lightning check-data --config {config} ")
        result = run(command.replace("--data_root /data", f"--data_root {data_root}"), in_copy)
    else:
        command = documented(config, "deft-lightning check-data")
        result = run(command, in_copy, env={"DEFT_DATA_ROOT": str(data_root)})
    init = yaml.safe_load((ROOT / config).read_text())["data"]["init_args"]
    entries = [("train", init["source"]), *(("eval", e) for e in [init.get("source_val"), *init["targets"]] if e)]
    counted = re.findall(r"^\| (train|eval) (\w+):(\w+)(?: \(([\w-]+)\))? \| (\d+) \|$", result.stdout, flags=re.M)
    assert [(kind, e["name"], e["split"]) for kind, e in entries] == [c[:3] for c in counted], result.stdout
    assert all(int(c[4]) > 0 for c in counted) and "all files read, paired and valid" in result.stdout
    conditions = [e["options"]["condition"] for _, e in entries if "condition" in e.get("options", {})]
    assert [c[3] for c in counted if c[1] == "acdc"] == [f"acdc-{c}" for c in conditions]  # one row each


@pytest.fixture(scope="module")
def lp_run(tmp_path_factory) -> Path:
    """The LP run that the LP-FT overlay's header names first: `deft-lightning fit --config configs/lp.yaml`."""
    cwd = tmp_path_factory.mktemp("lp")
    (cwd / "configs").symlink_to(ROOT / "configs")
    command = documented("configs/ablations/daft/lpft_bn_conversion.yaml", "deft-lightning fit --config configs/lp.yaml")
    result = run(command, cwd, *TINY, "--trainer.max_steps=2", "--trainer.limit_val_batches=0")
    assert "Run folder: runs/lp/version_0" in result.stdout
    return cwd


@pytest.mark.parametrize("base,overlay,converts", [("ft", "ft_bn_conversion", True), ("daft", "integrated_lpft", False),
                                                   ("lpft", "lpft_bn_conversion", True)])
def test_daft_table_5_header_fits(base, overlay, converts, tmp_path, request):
    """Each configs/ablations/daft/ header line fits; BN conversion runs exactly where its row of
    DAFT Table 5 has it (the LP-FT row from the LP run's checkpoint, as its header names it)."""
    if base == "lpft":
        cwd = request.getfixturevalue("lp_run")
    else:
        cwd = tmp_path
        (cwd / "configs").symlink_to(ROOT / "configs")
    config = f"configs/ablations/daft/{overlay}.yaml"
    result = run(documented(config, f"deft-lightning fit --config configs/{base}.yaml --config {config}"), cwd, *TINY,
                 "--trainer.max_steps=2", "--trainer.limit_val_batches=0")
    output = result.stdout + result.stderr
    assert ("BatchNorm layers converted" in output) is converts, output[-3000:]


def test_final_model_ablation_header_tests_one_training_run(in_copy):
    """configs/ablations/deft/final_model/*.yaml: `test --config .../IV.yaml --model.final_model=<row>
    --ckpt_path RUN.ckpt` tests the row's pair from the one IV training run: the override of the
    checkpoint's final model is taken and printed (test_checkpoint_cli.py checks what it scores)."""
    from deft_lightning.cli import main

    config = "configs/ablations/deft/final_model/IV.yaml"
    model = {**TINY_NET, "warmup_steps": 1, "beta_reference_steps": None, "beta_encoder": 0.5, "beta_decoder": 0.5}
    main(["fit", "--config", config, *cli_args(model, TINY_DATA), *QUIET, "--trainer.max_steps=3",
          "--trainer.limit_val_batches=0", "--model.init_args.style_augmentation=false"])
    (checkpoint,) = in_copy.glob("runs/IV/version_0/checkpoints/last.ckpt")
    command = documented("configs/ablations/deft/final_model/I.yaml", "deft-lightning test")
    assert "--model.final_model=I " in command
    result = run(command.replace("RUN.ckpt", str(checkpoint)), in_copy, *cli_args(TINY_NET, TINY_DATA), *QUIET)
    assert "final_model='I' from the command line/config (the checkpoint has 'IV')" in result.stdout + result.stderr
    assert (in_copy / "runs/IV/version_0/test/test_iou.md").is_file()


def test_report_over_several_run_folders(tmp_path):
    """docs/workflow.md's `deft-lightning report runs/a runs/b runs/c --out runs/report`, on three
    tested runs (two seeds of one config, one of another)."""
    from test_report import fake_run

    fake_run(tmp_path / "runs/a", 0.01, 0, 0.9)
    fake_run(tmp_path / "runs/b", 0.01, 1, 0.7)
    fake_run(tmp_path / "runs/c", 0.1, 0, 0.5)
    command = documented("docs/workflow.md", "deft-lightning report runs/a ")
    run(command, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "runs/report/report.csv")))
    assert [(row["run"], row["seeds"]) for row in rows] == [("lr=0.01", "0 1"), ("lr=0.1", "0")], rows
    assert "| lr=0.01 |" in (tmp_path / "runs/report/report.md").read_text()
    assert sorted(p.name for p in (tmp_path / "runs/report").glob("*.png")) == [
        "metric_vs_parameters.png", "per_class_iou.png", "per_domain_miou.png"]


def test_readme_layout_names_every_module_and_folder():
    """README's Layout block: every module of src/deft_lightning/ under its folder, and the
    top-level folders it names exist."""
    (block,) = re.findall(r"## Layout\n\n```\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    lines = block.splitlines()
    assert lines[0] == "src/deft_lightning/"
    listed = set()
    for line in lines[1:-1]:
        words = line.split()
        folder = words.pop(0) if words[0].endswith("/") else ""
        listed |= {folder + word for word in words}
    package = ROOT / "src/deft_lightning"
    assert listed == {p.relative_to(package).as_posix() for p in package.rglob("*.py") if p.name != "__init__.py"}
    assert all((ROOT / folder).is_dir() for folder in lines[-1].split())
