"""DeFT on tiny synthetic data: warm-up, the two pathways, the EMA of the opposite AC, final models,
resume, distance regularisation, and 2-process DDP (as a subprocess script)."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import TINY_NET, trainer_kwargs
from deft_lightning import DeFT, DGSegDataModule, EMACallback, SegmentationNet
from deft_lightning.tasks.deft import FINAL_MODELS

COMPONENTS = ("adaptive_encoder", "retentive_decoder", "retentive_encoder", "adaptive_decoder")
SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).resolve().parents[1]
ABLATION_CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs/ablations/deft").rglob("*.yaml"))


def snapshot(task, params_only=False):
    """{component: {name: tensor copy}} of the four components."""
    states = {}
    for name in COMPONENTS:
        module = getattr(task, name)
        items = module.named_parameters() if params_only else module.state_dict().items()
        states[name] = {k: v.detach().clone() for k, v in items}
    return states


def params_of(state, module):
    names = {name for name, _ in module.named_parameters()}
    return {k: v for k, v in state.items() if k in names}


def assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def changed(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


class Recorder(Callback):
    """Per step: the batch and components before it (before the warm-up callback acts), the gradients
    and parameters just before the optimizer step, and the components after the step (a trainer
    callback runs before the task's EMA callback)."""

    def __init__(self):
        self.batches, self.before, self.grads, self.stepping, self.after = [], [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items() if torch.is_tensor(v)})
        self.before.append(snapshot(pl_module))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({name: {k: None if p.grad is None else p.grad.clone()
                                  for k, p in getattr(pl_module, name).named_parameters()}
                           for name in COMPONENTS})
        self.stepping.append(snapshot(pl_module, params_only=True))

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.after.append(snapshot(pl_module))


def tiny_deft(**kwargs) -> DeFT:
    """DeFT on the tiny net with style augmentation and β by horizon off (unless given): the
    tests below check the mechanics against β as given, on the batch as drawn."""
    return DeFT(**{**TINY_NET, "style_augmentation": False, "beta_reference_steps": None, **kwargs})


def fit(task, data_kwargs, root, max_steps, callbacks=(), ckpt_path=None):
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = Trainer(**trainer_kwargs(root, max_steps=max_steps, callbacks=list(callbacks),
                                       enable_checkpointing=checkpointing))
    trainer.fit(task, DGSegDataModule(**data_kwargs), ckpt_path=ckpt_path)
    return trainer


def test_warmup_keeps_the_pretrained_encoder_and_stage_two_starts_from_it(tmp_path, tiny_data_kwargs):
    task = tiny_deft(warmup_steps=2, weight_decay=1e-2, warmup_weight_decay=1e-1, beta_reference_steps=80_000)
    pretrained = snapshot(task)["adaptive_encoder"]
    recorder = Recorder()
    fit(task, tiny_data_kwargs, tmp_path, 3, [recorder])

    for step in (0, 1):  # warm-up: both encoders untouched in parameters, the decoder trains
        after = recorder.after[step]
        for encoder in ("adaptive_encoder", "retentive_encoder"):
            assert_equal_states(params_of(after[encoder], task.adaptive_encoder), params_of(pretrained, task.adaptive_encoder))
        assert changed(after["adaptive_decoder"], recorder.before[step]["adaptive_decoder"])
    # e~2 ran in BN train mode during warm-up (its statistics moved); e1 never ran.
    assert changed(recorder.after[1]["retentive_encoder"], pretrained)
    assert_equal_states(recorder.after[1]["adaptive_encoder"], pretrained)

    # First stage-2 step, before the optimizer step: e1 = e~2 = pretrained, d2 = d~1 = warmed decoder.
    stepping, warmed = recorder.stepping[2], params_of(recorder.after[1]["adaptive_decoder"], task.adaptive_decoder)
    for encoder in ("adaptive_encoder", "retentive_encoder"):
        assert_equal_states(stepping[encoder], params_of(pretrained, task.adaptive_encoder))
    for decoder in ("adaptive_decoder", "retentive_decoder"):
        assert_equal_states(stepping[decoder], warmed)
    # β by horizon: a one-step stage 2 keeps the paper's weight 0.9999^80000 on the start point.
    beta = task.trainer.callback_metrics["train/beta_encoder"].item()
    assert beta == pytest.approx(0.9999 ** 80_000, rel=1e-5)


@pytest.mark.parametrize("mode", ["split", "pretrained", "warmed"])
def test_stage_two_start_state(tmp_path, tiny_data_kwargs, mode):
    task = tiny_deft(warmup_steps=1, stage2_encoder_bn=mode, weight_decay=1e-3, warmup_weight_decay=1e-2,
                schedule_steps=10)
    pretrained = snapshot(task)["adaptive_encoder"]
    fit(task, tiny_data_kwargs, tmp_path, 1)  # warm-up only
    warmed = snapshot(task)["retentive_encoder"]
    optimizer = task.trainer.optimizers[0]
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == {"encoder": 1e-3, "decoder": 1e-2}
    assert optimizer.state  # the decoder has momentum from warm-up

    task.on_warmup_end()
    state = snapshot(task)
    expected = {"split": (pretrained, warmed), "pretrained": (pretrained, pretrained), "warmed": (warmed, warmed)}[mode]
    assert_equal_states(state["adaptive_encoder"], expected[0])
    assert_equal_states(state["retentive_encoder"], expected[1])
    assert_equal_states(state["retentive_decoder"], state["adaptive_decoder"])
    assert task.stage == 2 and not optimizer.state  # fresh optimizer state, stage-2 weight decay
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == {"encoder": 1e-3, "decoder": 1e-3}
    assert not any(p.requires_grad for p in task.retentive_encoder.parameters())


def test_stage_two_gradients_steps_and_ema(tmp_path, tiny_data_kwargs):
    """Gradients reach only the ACs, e1's equals pathway 1's alone, RCs follow the β-recurrence."""
    steps, beta_encoder, beta_decoder = 3, 0.8, 0.6
    task = tiny_deft(warmup_steps=0, weight_decay=1e-2, momentum=0.9, lr=0.05,
                beta_encoder=beta_encoder, beta_decoder=beta_decoder)
    recorder = Recorder()
    trainer = fit(task, tiny_data_kwargs, tmp_path, steps, [recorder])

    for step in range(steps):
        grads, before, after = recorder.grads[step], recorder.before[step], recorder.after[step]
        for name in ("adaptive_encoder", "adaptive_decoder"):
            assert all(g is not None for g in grads[name].values()), name
            assert changed(after[name], before[name]), name
        for name in ("retentive_encoder", "retentive_decoder"):  # no gradient, untouched by the optimizer
            assert all(g is None for g in grads[name].values()), name
            assert_equal_states(params_of(after[name], getattr(task, name)), params_of(before[name], getattr(task, name)))

    # Pathway losses computed independently from the components as they were before step 0
    # (in the task's memory format, so that the same convolution kernels run).
    batch, before, grads = recorder.batches[0], recorder.before[0], recorder.grads[0]
    memory_format = torch.channels_last if task.uses_channels_last else torch.contiguous_format
    images = batch["image"].contiguous(memory_format=memory_format)
    pathway1 = SegmentationNet(**TINY_NET).to(memory_format=memory_format)
    pathway1.encoder.load_state_dict(before["adaptive_encoder"])
    pathway1.decoder.load_state_dict(before["retentive_decoder"])
    torch.nn.functional.cross_entropy(pathway1(images), batch["mask"], ignore_index=255).backward()
    for key, param in pathway1.encoder.named_parameters():
        torch.testing.assert_close(grads["adaptive_encoder"][key], param.grad, msg=key)
    pathway2 = SegmentationNet(**TINY_NET).to(memory_format=memory_format)
    pathway2.encoder.load_state_dict(before["retentive_encoder"])
    pathway2.decoder.load_state_dict(before["adaptive_decoder"])
    features = [f.detach() for f in pathway2.encoder(pathway2.normalize(images))]
    torch.nn.functional.cross_entropy(pathway2.decoder(features), batch["mask"], ignore_index=255).backward()
    for key, param in pathway2.decoder.named_parameters():
        torch.testing.assert_close(grads["adaptive_decoder"][key], param.grad, msg=key)

    # RC_t = β RC_{t−1} + (1 − β) AC_t with AC_t the opposite AC right after optimizer step t.
    expected = {rc: {k: v.double() for k, v in params_of(recorder.before[0][rc], getattr(task, rc)).items()}
                for rc in ("retentive_encoder", "retentive_decoder")}
    for after in recorder.after:
        for rc, ac, beta in (("retentive_encoder", "adaptive_encoder", beta_encoder),
                             ("retentive_decoder", "adaptive_decoder", beta_decoder)):
            for key in expected[rc]:
                expected[rc][key] = beta * expected[rc][key] + (1 - beta) * after[ac][key].double()
    final = snapshot(task, params_only=True)
    for rc in expected:
        for key, value in expected[rc].items():
            torch.testing.assert_close(final[rc][key].double(), value, rtol=1e-5, atol=1e-6, msg=f"{rc}.{key}")
    ema = next(c for c in trainer.callbacks if isinstance(c, EMACallback))
    assert ema.num_updates == steps


def test_final_model_evaluates_the_intended_pair():
    torch.manual_seed(0)
    state = tiny_deft(warmup_steps=0).state_dict()
    for key in state:  # make the four components differ
        if key.endswith("weight") and state[key].is_floating_point():
            state[key] = state[key] + 0.1 * torch.randn_like(state[key])
    images = torch.rand(2, 3, 64, 64)
    outputs = {}
    for final_model, (encoder, decoder) in FINAL_MODELS.items():
        task = tiny_deft(warmup_steps=0, final_model=final_model)
        task.load_state_dict(state)
        reference = SegmentationNet(**TINY_NET).eval()
        reference.encoder.load_state_dict({k[len(encoder) + 1:]: v for k, v in state.items() if k.startswith(encoder + ".")})
        reference.decoder.load_state_dict({k[len(decoder) + 1:]: v for k, v in state.items() if k.startswith(decoder + ".")})
        with torch.no_grad():
            outputs[final_model] = task.eval()(images)
            torch.testing.assert_close(outputs[final_model], reference(images), rtol=0, atol=0)
    assert len({tuple(o.flatten()[:50].tolist()) for o in outputs.values()}) == 4
    # During warm-up (stage 1) evaluation uses the frozen encoder with the decoder being warmed up.
    warming = tiny_deft(warmup_steps=5, final_model="IV")
    warming.load_state_dict({**state, "_extra_state": {"stage": 1}})
    with torch.no_grad():
        torch.testing.assert_close(warming.eval()(images), outputs["III"], rtol=0, atol=0)


def test_resume_mid_stage_two_is_bit_identical(tmp_path, tiny_data_kwargs):
    kwargs = dict(**TINY_NET, style_augmentation=False, beta_reference_steps=None, warmup_steps=1, beta_encoder=0.7, beta_decoder=0.6, weight_decay=1e-3,
                  warmup_weight_decay=1e-2, warmup_lr=0.02, distance_regularization="l2sp", l2sp_weight=0.1)
    full = DeFT(**kwargs)
    start = copy.deepcopy(full.state_dict())
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    fit(full, tiny_data_kwargs, tmp_path / "a", 4, [checkpoints])
    middle = sorted((tmp_path / "ckpt").glob("*step=2*.ckpt"))
    assert middle, list((tmp_path / "ckpt").iterdir())
    saved = torch.load(middle[0], weights_only=False)
    assert saved["state_dict"]["_extra_state"] == {"stage": 2}
    assert {key.split(".")[0] for key in saved["state_dict"]} >= {*COMPONENTS, "adaptive_start"}
    callback_states = {k.split("{")[0]: v for k, v in saved["callbacks"].items()}
    assert callback_states["EMACallback"] == {"num_updates": 1}
    assert callback_states["DecoderWarmup"] == {"finished": True}

    resumed = DeFT(**kwargs)
    resumed.load_state_dict(start)
    trainer = fit(resumed, tiny_data_kwargs, tmp_path / "b", 4, ckpt_path=middle[0])
    assert next(c for c in trainer.callbacks if isinstance(c, EMACallback)).num_updates == 3
    for key, value in full.state_dict().items():
        if key == "_extra_state":
            assert value == resumed.state_dict()[key]
        else:
            assert torch.equal(value, resumed.state_dict()[key]), key


def test_lr_schedule_restarts_at_stage_two_and_warmup_has_its_own_lr_and_weight_decay():
    task = tiny_deft(warmup_steps=4, schedule_steps=10, lr=0.1, warmup_lr=0.5, weight_decay=1e-3,
                warmup_weight_decay=1e-2, poly_power=0.9)
    config = task.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(8):
        lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    poly = [(1 - t / 10) ** 0.9 for t in range(8)]
    assert [lr["decoder"] for lr in lrs] == pytest.approx([0.5 * p for p in poly[:4]] + [0.1 * p for p in poly[:4]])
    assert [lr["encoder"] for lr in lrs] == pytest.approx([0.1 * p for p in poly[:4]] * 2)
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == {"encoder": 1e-3, "decoder": 1e-2}


def test_beta_by_horizon_keeps_the_papers_weight_on_the_start_point():
    task = tiny_deft(warmup_steps=0, beta_encoder=0.999, beta_decoder=0.9999, beta_reference_steps=80_000)
    beta_encoder, beta_decoder = task.betas_for(1000)
    assert beta_encoder ** 1000 == pytest.approx(0.999 ** 80_000, rel=1e-6)
    assert beta_decoder ** 1000 == pytest.approx(0.9999 ** 80_000, rel=1e-6)
    assert tiny_deft(warmup_steps=0, beta_encoder=0.999).betas_for(1000) == (0.999, 0.9999)


@pytest.mark.parametrize("steps", [0, -80_000])
def test_beta_reference_steps_must_be_positive(steps):
    """R = 0 would freeze the RCs (β^0 = 1) and R < 0 make them diverge (β > 1): refused by name."""
    with pytest.raises(ValueError, match="beta_reference_steps"):
        tiny_deft(warmup_steps=0, beta_reference_steps=steps)


def test_projection_keeps_every_adaptive_tensor_within_the_radius(tmp_path, tiny_data_kwargs):
    radius = 1e-3
    task = tiny_deft(warmup_steps=0, lr=0.5, distance_regularization="projection", projection_radius=radius)
    start = snapshot(task, params_only=True)
    fit(task, tiny_data_kwargs, tmp_path, 2)
    distances = [(p - start[name][key]).norm().item()
                 for name in ("adaptive_encoder", "adaptive_decoder")
                 for key, p in getattr(task, name).named_parameters()]
    assert max(distances) <= radius * (1 + 1e-4)
    assert sum(d > radius * 0.99 for d in distances) > len(distances) / 2  # most were pulled back


def test_l2sp_penalty_is_the_squared_distance_to_the_stage_two_start():
    task = tiny_deft(warmup_steps=0, distance_regularization="l2sp")
    assert task.distance_to_start().item() == 0
    weight = task.adaptive_encoder.conv1.weight
    with torch.no_grad():
        weight.add_(0.01)
    penalty = task.distance_to_start()
    assert penalty.item() == pytest.approx(weight.numel() * 1e-4, rel=1e-3)
    penalty.backward()
    torch.testing.assert_close(weight.grad, torch.full_like(weight, 0.02), rtol=1e-3, atol=1e-6)


@pytest.mark.slow  # two fresh processes importing torch + Lightning: ~25 s on the 2-core CPU
def test_two_process_ddp_keeps_retentive_components_identical(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPTS / "ddp_deft.py"), str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["ema_updates"] == ranks[1]["ema_updates"] == 2
    assert ranks[0]["stage"] == ranks[1]["stage"] == 2
    for key in ("retentive_encoder", "retentive_decoder", "adaptive_encoder", "adaptive_decoder"):
        assert ranks[0]["params"][key] == ranks[1]["params"][key], key
    assert ranks[0]["params"]["retentive_encoder"] != ranks[0]["params"]["adaptive_encoder"]


@pytest.mark.parametrize("config", ABLATION_CONFIGS)
def test_every_deft_ablation_config_parses(config):
    """Each ablation config is a full config: it parses and instantiates model and data alone."""
    from deft_lightning.cli import lightning_cli

    cli = lightning_cli(["--config", str(ROOT / config), "--trainer.logger=false"], run=False)
    assert cli.datamodule is not None
    if "/final_model/" in config:
        assert cli.model.hparams.final_model == Path(config).stem
    if "/beta/" in config:
        assert cli.model.hparams.beta_encoder == cli.model.hparams.beta_decoder == float(Path(config).stem[5:])


def test_ablation_tables_have_every_row():
    tables = {}
    for config in ABLATION_CONFIGS:
        table, name = config.split("/")[-2:]
        tables.setdefault(table, []).append(name)
    assert tables == {"beta": ["beta_0.99.yaml", "beta_0.999.yaml", "beta_0.9999.yaml"],
                      "components": ["1_joint.yaml", "2_joint_aug.yaml", "3_joint_aug_warmup.yaml", "4_deft.yaml"],
                      "final_model": ["I.yaml", "II.yaml", "III.yaml", "IV.yaml"],
                      "strategy": ["1_joint.yaml", "2_joint_ema.yaml", "3_deft.yaml"]}
