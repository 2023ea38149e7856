"""Weights & Biases: the logger preset in an offline run, and the sweep configs' commands."""

import json
import struct
from pathlib import Path

import pytest
import yaml
from PIL import Image

from test_cli import ROOT, deft_lightning

SWEPT = {  # sweep file -> the keys it sweeps (the others are fixed values)
    "daft_lr_step1.yaml": ["model.init_args.lr"],
    "daft_lr_step2.yaml": ["model.init_args.decoder_lr"],
    "deft_beta.yaml": ["model.init_args.beta_encoder", "model.init_args.beta_decoder", "model.init_args.lr"],
    "deft_beta_cpu.yaml": ["model.init_args.beta_encoder", "model.init_args.beta_decoder"],
    "fishertune_fraction_lr.yaml": ["model.init_args.fraction", "model.init_args.lr"],
}


def test_every_sweep_config_is_listed():
    assert sorted(p.name for p in (ROOT / "configs/sweeps").glob("*.yaml")) == sorted(SWEPT)


@pytest.mark.parametrize("name", sorted(SWEPT))
def test_sweep_command_parses_into_the_swept_values(name, monkeypatch):
    """What `wandb agent` runs, ${args} expanded to --key=value, reaches the task's hparams."""
    from deft_lightning.cli import lightning_cli

    sweep = yaml.safe_load((ROOT / "configs/sweeps" / name).read_text())
    assert sweep["program"] == "deft-lightning" and sweep["method"] == "grid"
    assert sweep["metric"] == {"name": "val/mIoU_source", "goal": "maximize"}  # never a target domain
    command = sweep["command"]
    assert command[:3] == ["${env}", "${program}", "fit"] and command[-1] == "${args}"
    assert [key for key, spec in sweep["parameters"].items() if "values" in spec] == SWEPT[name]
    monkeypatch.chdir(ROOT)
    for pick in (0, -1):  # first and last grid point
        values = {key: spec["values"][pick] if "values" in spec else spec["value"]
                  for key, spec in sweep["parameters"].items()}
        cli = lightning_cli([*command[3:-1], *(f"--{key}={value}" for key, value in values.items())], run=False)
        assert type(cli.trainer.logger).__name__ == "WandbLogger"
        save_dir = Path(cli.trainer.logger.save_dir)  # the run folder's fit/: a config.yaml per run
        assert save_dir.parts[0] == "runs" and save_dir.parent.name.startswith("version_") and save_dir.name == "fit"
        for key, value in values.items():
            assert cli.model.hparams[key.rsplit(".", 1)[1]] == value


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's ``.wandb`` file (LevelDB log framing: 32 KiB
    blocks of chunks with a 7-byte header, after a 7-byte ``:W&B`` file header); wandb 0.31 has
    no Python reader of its own and writes no summary/config files offline."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start a record
        if kind in (1, 4):  # FULL/LAST end one
            records.append(wandb_internal_pb2.Record.FromString(pending))
    return records


def test_offline_wandb_run_records_hparams_and_per_domain_metrics(tmp_path):
    """A CLI fit with configs/logger/wandb.yaml writes a finished offline run with the task's
    hparams and every domain's validation mIoU (what a sweep's metric and a user's charts read)."""
    result = deft_lightning(
        "fit", "--config", str(ROOT / "configs/joint.yaml"), "--config", str(ROOT / "configs/logger/wandb.yaml"),
        "--model.init_args.lr=0.003",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0", "--data.init_args.synthetic_image_size=[64,128]",
        "--data.init_args.crop_size=[64,128]", cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "runs/joint/version_0"  # the run folder: wandb files, its own config.yaml, checkpoints
    (run_file,) = (run / "fit/wandb").glob("offline-run-*/run-*.wandb")
    assert (run / "fit/config.yaml").is_file()
    records = wandb_records(run_file)
    by_kind = lambda kind: [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]  # noqa: E731
    (exit_record,) = by_kind("exit")  # finished: a sweep agent reads the summary
    assert exit_record.exit_code == 0
    config = {item.key: json.loads(item.value_json) for c in by_kind("config") for item in c.update}
    assert config["lr"] == 0.003 and config["arch"] == "Unet" and config["encoder_weights"] == "imagenet-offline"
    logged = {}
    for history in by_kind("history"):
        logged.update({"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in history.item})
    domains = ["clear", "dusk", "fog", "night", "snow", "desert"]
    for key in ["val/mIoU_mean", "val/mIoU_source", *(f"val/{d}/mIoU" for d in domains)]:
        assert 0.0 <= logged[key] <= 1.0, key
    # LogPredictions: an image | truth | prediction strip per domain, in one step, PNG in the run's files.
    overlay_steps = {h.step.num for h in by_kind("history") if any("val/predictions" in "/".join(i.nested_key)
                                                                   for i in h.item)}
    assert len(overlay_steps) == 1, overlay_steps
    for domain in domains:
        assert logged[f"val/predictions/{domain}/_type"] == "images/separated"
        (filename,) = logged[f"val/predictions/{domain}/filenames"]
        with Image.open(run_file.parent / "files" / filename) as png:
            assert png.size == (3 * 128, 64)  # image | truth | prediction at 64 x 128
    assert list(run.glob("checkpoints/*.ckpt"))
