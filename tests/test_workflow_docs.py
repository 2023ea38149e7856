"""What docs/workflow.md (and the other docs) tell users to type for sweeps and loggers."""

import re
import shlex

import pytest
import yaml
from conftest import TINY_DATA, TINY_NET

from deft_lightning.sweep import expand, load_sweep, main
from test_cli import ROOT, deft_lightning

DOCUMENTED = sorted({line.strip().rstrip("\\").strip() for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
                                                                     *(ROOT / "configs/sweeps").glob("*.yaml")]
                     for line in re.findall(r"deft-lightning sweep [^`\n]*", path.read_text())})


def test_the_docs_show_sweep_commands():
    assert any("--parallel 2" in c for c in DOCUMENTED) and len(DOCUMENTED) >= 4, DOCUMENTED


@pytest.mark.parametrize("command", DOCUMENTED)
def test_documented_sweep_command_expands_and_its_first_point_parses(command, monkeypatch, capsys):
    """Each documented `deft-lightning sweep` line, dry run: every point listed, and the first
    point's fit command (runner's own arguments included) parses in the library's CLI."""
    from deft_lightning.cli import lightning_cli

    monkeypatch.chdir(ROOT)
    args = shlex.split(command)[2:]
    split = args.index("--") if "--" in args else len(args)
    main([*args[:split], "--dry_run", "true", *args[split:]])
    printed = capsys.readouterr().out.splitlines()
    commands = [line.strip() for line in printed if line.startswith("  /usr/bin/env deft-lightning fit")]
    assert len(commands) == len(expand(load_sweep(args[0])))
    point = shlex.split(commands[0])
    cli = lightning_cli(point[3:], run=False)
    assert cli.trainer.default_root_dir.startswith("runs/sweeps/")
    assert any(type(c).__name__ == "RunSummary" for c in cli.trainer.callbacks)


def test_tensorboard_preset_logs_overlays_and_the_test_table(tmp_path):
    """configs/logger/tensorboard.yaml as its header says, then `test`: overlay images of every
    domain at validation, the per-class IoU text at test, confusion PNGs beside test_iou.md."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny = {"model": {"init_args": {**TINY_NET, "warmup_steps": 1}},
            "data": {"init_args": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_DATA.items()}},
            "trainer": {"max_steps": 2, "val_check_interval": 2, "num_sanity_val_steps": 0,
                        "enable_progress_bar": False, "enable_model_summary": False}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    configs = ["--config", str(ROOT / "configs/deft.yaml"), "--config", str(ROOT / "configs/logger/tensorboard.yaml"),
               "--config", "tiny.yaml"]
    fit = deft_lightning("fit", *configs, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (checkpoint,) = tmp_path.rglob("last.ckpt")  # wherever the run folder layout puts it
    test = deft_lightning("test", *configs, f"--ckpt_path={checkpoint}", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    events = [p.parent for p in sorted(tmp_path.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)]
    assert len(events) == 2, events  # the fit's and the test's
    fit_events, test_events = (EventAccumulator(str(d), size_guidance={"images": 0, "tensors": 0}).Reload()
                               for d in events)
    assert sorted(fit_events.Tags()["images"]) == [f"val/predictions/{d}" for d in sorted(["clear", "night", "fog"])]
    (image,) = fit_events.Images("val/predictions/night")
    assert (image.width, image.height) == (3 * 128, 64)  # image | truth | prediction
    (text,) = test_events.Tensors("test/per_class_iou/text_summary")
    assert b"| **mIoU** |" in text.tensor_proto.string_val[0]
    folder = next(tmp_path.rglob("test_iou.md")).parent
    assert sorted(p.name for p in folder.glob("confusion_*.png")) == ["confusion_clear.png", "confusion_fog.png",
                                                                      "confusion_night.png"]
