"""FisherTune on tiny synthetic data: the masked update (SGD and AdamW), resume, the score cache,
transformer encoders, and 2-process DDP (as a subprocess script)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import TINY_NET, trainer_kwargs
from deft_lightning import DGSegDataModule, FisherTune
from deft_lightning.tasks.fishertune import ScoreCacheError

SCRIPTS = Path(__file__).parent / "scripts"
SMALL = {"synthetic_image_size": (32, 32), "crop_size": (32, 32), "synthetic_train_size": 4, "batch_size": 2}


def encoder_params(task):
    return {k: v.detach().clone() for k, v in task.net.encoder.named_parameters()}


class GradientRecorder(Callback):
    """Which encoder entries ever had a non-zero gradient (recorded before the optimizer step)."""

    def __init__(self):
        self.nonzero = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {k: (p.grad != 0) if p.grad is not None else torch.zeros_like(p, dtype=torch.bool)
                 for k, p in pl_module.net.encoder.named_parameters()}
        self.nonzero = grads if self.nonzero is None else {k: v | grads[k] for k, v in self.nonzero.items()}


def fit(task, data_kwargs, root, max_steps, callbacks=(), ckpt_path=None):
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = Trainer(**trainer_kwargs(root, max_steps=max_steps, callbacks=list(callbacks),
                                       enable_checkpointing=checkpointing))
    trainer.fit(task, DGSegDataModule(**data_kwargs), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_only_selected_encoder_entries_move(tmp_path, tiny_data_kwargs, optimizer):
    """20 steps with SGD + momentum + weight decay, and with AdamW (decoupled decay)."""
    task = FisherTune(**TINY_NET, score="fisher", fraction=0.05, estimation_batches=1, optimizer=optimizer,
                      lr=0.05 if optimizer == "sgd" else 1e-3, momentum=0.9, weight_decay=0.05)
    start = encoder_params(task)
    decoder_start = {k: v.detach().clone() for k, v in task.net.decoder.named_parameters()}
    recorder = GradientRecorder()
    fit(task, dict(tiny_data_kwargs, **SMALL), tmp_path, 20, [recorder])

    total = sum(v.numel() for v in start.values())
    assert sum(int(m.sum()) for m in task.masks.values()) == math.ceil(0.05 * total)
    moved_selected = 0
    for name, value in encoder_params(task).items():
        mask = task.masks[name]
        assert torch.equal(value[~mask], start[name][~mask]), name  # bit-identical
        active = mask & recorder.nonzero[name]
        assert (value[active] != start[name][active]).all(), name
        moved_selected += int(active.sum())
    assert moved_selected > 0.9 * math.ceil(0.05 * total)
    for name, value in task.net.decoder.named_parameters():
        assert not torch.equal(value, decoder_start[name]), name
    if optimizer == "sgd":  # weight decay alone would have moved every unselected entry
        assert all(s.get("momentum_buffer") is not None for s in task.trainer.optimizers[0].state.values())


def test_resume_mid_run_is_bit_identical_with_warmup_ema_and_a_growing_fraction(tmp_path, tiny_data_kwargs):
    kwargs = dict(**TINY_NET, score="dr_fim", fraction=0.02, final_fraction=0.1, grow_steps=3, estimation_batches=1,
                  warmup_steps=1, ema_beta=0.5, weight_decay=1e-2)
    data = dict(tiny_data_kwargs, **SMALL)
    torch.manual_seed(0)
    full = FisherTune(**kwargs)
    start = {k: v.clone() for k, v in full.state_dict().items() if k != "_extra_state"}
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    fit(full, data, tmp_path / "a", 5, [checkpoints])
    (middle,) = sorted((tmp_path / "ckpt").glob("*step=2*.ckpt"))
    saved = torch.load(middle, weights_only=True)["state_dict"]["_extra_state"]
    assert saved["masks"] is not None and saved["kept_fraction"] == 0.02  # grows from the next step on
    assert full.kept_fraction == pytest.approx(0.1)

    resumed = FisherTune(**kwargs)
    resumed.load_state_dict({**start, "_extra_state": {"masks": None, "ranks": None, "kept_fraction": None}})
    fit(resumed, data, tmp_path / "b", 5, ckpt_path=middle)
    for key, value in full.state_dict().items():
        other = resumed.state_dict()[key]
        if key == "_extra_state":
            assert value["kept_fraction"] == other["kept_fraction"]
            for part in ("masks", "ranks"):
                assert all(torch.equal(value[part][n], other[part][n]) for n in value[part]), part
        else:
            assert torch.equal(value, other), key


def test_warmup_leaves_the_encoder_and_estimates_after_it(tmp_path, tiny_data_kwargs):
    task = FisherTune(**TINY_NET, score="fisher", estimation_batches=1, warmup_steps=2, weight_decay=0.1)
    start = encoder_params(task)
    fit(task, dict(tiny_data_kwargs, **SMALL), tmp_path, 2)
    assert task.masks is None  # never estimated during the warm-up
    assert all(torch.equal(v, start[k]) for k, v in encoder_params(task).items())


def estimation_batches(count=1, size=2, hw=(32, 32)):
    gen = torch.Generator().manual_seed(0)
    return [(torch.rand(size, 3, *hw, generator=gen), torch.randint(0, 19, (size, *hw), generator=gen))
            for _ in range(count)]


def test_score_cache_is_reused_and_a_stale_or_foreign_cache_is_refused(tmp_path, monkeypatch):
    cache = tmp_path / "scores.safetensors"
    data = estimation_batches()
    monkeypatch.setattr(FisherTune, "estimation_data", lambda self: data)
    kwargs = dict(**TINY_NET, score="dr_fim", estimator="variational", variational_steps=2, score_cache=str(cache))
    torch.manual_seed(0)
    first = FisherTune(**kwargs)
    state = first.state_dict()
    first.build_masks()
    assert cache.exists()

    # Same weights, data and estimation settings, another score: loaded, not estimated.
    second = FisherTune(**{**kwargs, "score": "fisher", "fraction": 0.1})
    second.load_state_dict(state)
    monkeypatch.setattr(FisherTune, "estimate_ingredients", lambda self, batches: pytest.fail("estimated again"))
    second.build_masks()
    third = FisherTune(**kwargs)
    third.load_state_dict(state)
    third.build_masks()
    assert all(torch.equal(first.masks[n], third.masks[n]) for n in first.masks)
    assert any(not torch.equal(first.masks[n], second.masks[n]) for n in first.masks)

    for stale in (FisherTune(**kwargs),  # other weights
                  FisherTune(**{**kwargs, "variational_steps": 3})):  # other settings
        with pytest.raises(ScoreCacheError, match="scores.safetensors"):
            stale.build_masks()
    monkeypatch.setattr(FisherTune, "estimation_data", lambda self: estimation_batches(size=3))  # other data
    with pytest.raises(ScoreCacheError, match="other weights, data or settings"):
        third.build_masks()
    cache.write_bytes(b"not a safetensors file")
    with pytest.raises(ScoreCacheError, match="scores.safetensors"):
        third.build_masks()


@pytest.mark.slow  # Segformer ~35 s, DPT ~50 s on the loaded 2-core CPU (vmap's fallback for CPU flash attention)
@pytest.mark.parametrize("arch,encoder", [("Segformer", "mit_b0"), ("DPT", "tu-test_vit")])
def test_transformer_encoders_estimate_and_train_masked(arch, encoder, monkeypatch):
    data = estimation_batches(hw=(32, 32))
    monkeypatch.setattr(FisherTune, "estimation_data", lambda self: data)
    task = FisherTune(arch=arch, encoder_name=encoder, encoder_weights=None, score="dr_fim", fraction=0.05,
                      weight_decay=0.1, schedule_steps=10)
    task.build_masks()
    task._prepare_masked_update()
    start = encoder_params(task)
    optimizer = torch.optim.SGD(task.param_groups(), lr=0.1, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        task.training_loss(*data[0]).backward()
        task.on_before_optimizer_step(optimizer)
        optimizer.step()
        task.restore_unselected()
    moved = 0
    for name, value in encoder_params(task).items():
        mask = task.masks[name]
        assert torch.equal(value[~mask], start[name][~mask]), name
        moved += int((value[mask] != start[name][mask]).sum())
    assert moved > 0


@pytest.mark.slow  # two fresh processes importing torch + Lightning: ~25 s on the 2-core CPU
def test_two_process_ddp_ends_with_identical_masks_and_weights(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPTS / "ddp_fishertune.py"), str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["masks"] == ranks[1]["masks"] and ranks[0]["selected"] > 0
    assert ranks[0]["params"] == ranks[1]["params"]
    assert ranks[0]["estimation_images"] != ranks[1]["estimation_images"]  # each rank saw its own share


ROOT = Path(__file__).resolve().parents[1]
ABLATION_CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs/ablations/fishertune").glob("*.yaml"))
ABLATION_ROWS = {  # config -> (score, estimator, selection); None: full finetuning
    "0_full": None, "1_random": ("random", "direct", "global"), "2_fisher": ("fisher", "direct", "global"),
    "3_delta_fisher": ("delta_fisher", "direct", "global"), "4_dr_fim": ("dr_fim", "direct", "global"),
    "5_dr_fim_variational": ("dr_fim", "variational", "global"), "6_dr_fim_per_layer": ("dr_fim", "direct", "per_layer"),
}


def test_ablation_table_has_every_row():
    assert [Path(c).stem for c in ABLATION_CONFIGS] == list(ABLATION_ROWS)


@pytest.mark.parametrize("config", ABLATION_CONFIGS)
def test_every_fishertune_ablation_config_parses(config):
    from deft_lightning.cli import lightning_cli

    cli = lightning_cli(["--config", str(ROOT / config), "--trainer.logger=false"], run=False)
    assert cli.datamodule is not None
    row = ABLATION_ROWS[Path(config).stem]
    if row is None:
        assert type(cli.model).__name__ == "JointFinetune"
    else:
        hp = cli.model.hparams
        assert (hp.score, hp.estimator, hp.selection) == row and hp.fraction == 0.05
        assert hp.warmup_steps == 30


def test_fishertune_config_fits_through_the_cli_and_caches_its_scores(tmp_path):
    """The config's header commands, with a tiny net, tiny images and a one-step warm-up."""
    from test_cli import deft_lightning

    cache = tmp_path / "runs/fishertune_scores.safetensors"
    result = deft_lightning(
        "fit", "--config", str(ROOT / "configs/fishertune.yaml"), "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2", "--model.init_args.encoder_name=resnet18",
        "--model.init_args.encoder_weights=null", "--model.init_args.arch_kwargs={encoder_depth: 3, decoder_channels: [32, 16, 8]}",
        "--model.init_args.warmup_steps=1", "--model.init_args.estimation_batches=1",
        f"--model.init_args.score_cache={cache}", "--data.init_args.synthetic_image_size=[32,64]",
        "--data.init_args.crop_size=[32,64]", "--data.init_args.batch_size=2", "--data.init_args.synthetic_val_size=2",
        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert cache.exists()
    (checkpoint,) = tmp_path.glob("runs/fishertune/version_0/checkpoints/last.ckpt")
    masks = torch.load(checkpoint, weights_only=True)["state_dict"]["_extra_state"]["masks"]
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == math.ceil(0.05 * total)


def test_a_vit_encoder_loads_from_a_local_timm_weights_file(tmp_path):
    """What docs/fishertune.md tells DINOv2/EVA02 users to do, with timm's tiny test ViT."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    task = FisherTune(arch="DPT", encoder_name="tu-test_vit", encoder_weights=str(tmp_path / "vit.safetensors"))
    encoder = dict(task.net.encoder.named_parameters())
    for name, value in vit.named_parameters():
        assert torch.equal(encoder[f"model.{name}"], value), name


def test_true_fisher_labels_with_the_variational_estimator_are_refused():
    """The variational estimate minimises the loss on the batch's labels: ``fisher_labels='true'``
    would be ignored there, so it is an error naming both parameters."""
    with pytest.raises(ValueError, match="fisher_labels.*estimator"):
        FisherTune(**TINY_NET, estimator="variational", fisher_labels="true")
    assert FisherTune(**TINY_NET, estimator="direct", fisher_labels="true").hparams.fisher_labels == "true"
