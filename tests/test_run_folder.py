"""One folder per run: fit -> test -> predict of one config through `deft-lightning` leave
everything under runs/<config>/version_<N>, each command prints it; predict writes one overlay
and one train-id PNG per input at the input's size; LP re-run then LP-FT starts from the new LP
checkpoint, named explicitly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fake_datasets import make_photos
from test_cli import ROOT, deft_lightning
from test_data_presets import TINY_ARGS

SYNTHETIC_ARGS = ["--config", str(ROOT / "configs/joint.yaml"), *TINY_ARGS, "--data.init_args.synthetic_train_size=4",
                  "--data.init_args.synthetic_targets=[fog]"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """fit, test, then predict on a folder of photos, as the README shows them."""
    cwd = tmp_path_factory.mktemp("pipeline")
    photos = make_photos(cwd / "photos")
    fit = deft_lightning("fit", *SYNTHETIC_ARGS, "--trainer.max_steps=2", cwd=cwd)
    assert fit.returncode == 0, fit.stderr[-4000:]
    checkpoint = "runs/joint/version_0/checkpoints/last.ckpt"
    test = deft_lightning("test", *SYNTHETIC_ARGS, f"--ckpt_path={checkpoint}", cwd=cwd)
    assert test.returncode == 0, test.stderr[-4000:]
    predict = deft_lightning("predict", *SYNTHETIC_ARGS, f"--ckpt_path={checkpoint}",
                             f"--data.init_args.predict_root={photos}", cwd=cwd)
    assert predict.returncode == 0, predict.stderr[-4000:]
    return cwd, {"fit": fit, "test": test, "predict": predict}


def test_fit_test_predict_share_one_run_folder_and_print_it(pipeline):
    cwd, results = pipeline
    assert sorted(p.name for p in (cwd / "runs").iterdir()) == ["joint"]
    run = cwd / "runs/joint/version_0"
    assert sorted(p.name for p in (cwd / "runs/joint").iterdir()) == ["version_0"]
    for stage, result in results.items():
        assert "Run folder: runs/joint/version_0" in result.stdout, stage
        assert (run / stage / "config.yaml").is_file(), stage
    assert (run / "checkpoints/last.ckpt").is_file()
    assert "fog" in (run / "test/test_iou.md").read_text()
    assert "Predictions: runs/joint/version_0/predict/predictions" in results["predict"].stdout
    # One results table, domains as columns (not Lightning's per-dataloader metric tables).
    output = results["test"].stdout + results["test"].stderr
    assert "| class | clear (source) | fog |" in output
    assert "Test metric" not in output


def test_predict_writes_every_photo_at_its_size_without_overwriting(pipeline):
    cwd, _ = pipeline
    out = cwd / "runs/joint/version_0/predict/predictions/predict"
    photos = sorted((cwd / "photos").iterdir())
    assert len(photos) == 4  # street.jpg and street.png share a stem
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 2 * len(photos), written
    for photo in photos:
        name = photo.stem if photo.stem != "street" else photo.name
        with Image.open(photo) as image:
            size = image.size
        for kind in ("overlay", "trainid"):
            with Image.open(out / f"{name}_{kind}.png") as prediction:
                assert prediction.size == size, (photo, kind)
        ids = np.asarray(Image.open(out / f"{name}_trainid.png"))
        assert ids.max() < 19


def _net_state(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {key: value for key, value in state.items() if key.startswith("net.") and value.is_floating_point()}


def test_lp_rerun_then_lpft_starts_from_the_new_lp_checkpoint(tmp_path, monkeypatch, capsys):
    from deft_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    tiny = [*TINY_ARGS, "--data.init_args.synthetic_train_size=4", "--data.init_args.synthetic_targets=[fog]",
            "--trainer.max_steps=2", "--trainer.enable_progress_bar=false"]
    for seed in (0, 1):  # LP, then a re-run (another seed: other weights)
        main(["fit", "--config", str(ROOT / "configs/lp.yaml"), *tiny, f"--seed_everything={seed}"])
    assert f"Run folder: {Path('runs/lp/version_1')}" in capsys.readouterr().out
    # LP-FT without naming the LP checkpoint: one clear error, no empty folder left behind.
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs/lpft.yaml"), *tiny])
    assert "LP_RUN_FOLDER" in capsys.readouterr().err
    assert all(any(folder.iterdir()) for folder in (tmp_path / "runs").rglob("*") if folder.is_dir())
    # lr 0: LP-FT's weights stay those it started from.
    main(["fit", "--config", str(ROOT / "configs/lpft.yaml"), *tiny, "--model.init_args.lr=0",
          "--model.init_args.decoder_lr=0", "--model.init_args.init_checkpoint=runs/lp/version_1/checkpoints/last.ckpt"])
    printed = capsys.readouterr().out.split("Run folder: ")[-1].split()[0]  # the folder it names
    lpft = _net_state(tmp_path / printed / "checkpoints/last.ckpt")
    new, old = (_net_state(tmp_path / f"runs/lp/version_{v}/checkpoints/last.ckpt") for v in (1, 0))
    head = next(key for key in lpft if "segmentation_head" in key or "head" in key)
    assert all(torch.equal(lpft[key], new[key]) for key in lpft)
    assert not torch.equal(lpft[head], old[head])


@pytest.mark.parametrize("variable", ["LOCAL_RANK", "NODE_RANK"])
def test_a_fit_on_a_ddp_rank_other_than_0_opens_no_run_folder(tmp_path, monkeypatch, variable):
    """Every DDP rank runs the CLI (Lightning's launcher re-runs the command; torchrun/srun start
    it on every node): rank 0 opens the run folder, the others must not open a ``version_<N>``
    of their own (left empty, it became the "newest run" that ``--ckpt_path last`` looked in)."""
    from lightning.pytorch.utilities import rank_zero_only

    from deft_lightning.cli import DeftLightningCLI, lightning_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(DeftLightningCLI, "_run_subcommand", lambda self, subcommand: None)
    fit = ["fit", "--config", str(ROOT / "configs/joint.yaml"), *TINY_ARGS]
    lightning_cli(fit)
    assert [p.name for p in (tmp_path / "runs/joint").iterdir()] == ["version_0"]
    if variable == "LOCAL_RANK":  # what Lightning reads from LOCAL_RANK, RANK or SLURM_PROCID
        monkeypatch.setattr(rank_zero_only, "rank", 1)
    else:  # node 1's first process under Lightning's own launcher
        monkeypatch.setenv("NODE_RANK", "1")
    lightning_cli(fit)
    assert [p.name for p in (tmp_path / "runs/joint").iterdir()] == ["version_0"]
