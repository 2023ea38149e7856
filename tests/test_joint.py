"""JointFinetune with its EMA and warm-up callbacks, on tiny synthetic data."""

import copy
import json

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from conftest import trainer_kwargs
from deft_lightning import DGSegDataModule, EMACallback, JointFinetune
from deft_lightning.callbacks import RunSummary
from deft_lightning.callbacks.ema import EMAPair, check_precision, ema_update


class RecordAfterStep(Callback):
    """Snapshots of the net's (or ``module(task)``'s) state after every optimizer step (runs
    before the EMA callback)."""

    def __init__(self, module=lambda task: task.net):
        self.states = []
        self.module = module

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.states.append({k: v.detach().clone() for k, v in self.module(pl_module).state_dict().items()})


def fit(task, data_kwargs, tmp_path, max_steps, callbacks=(), ckpt_path=None):
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=max_steps, callbacks=list(callbacks),
                                       enable_checkpointing=checkpointing))
    trainer.fit(task, DGSegDataModule(**data_kwargs), ckpt_path=ckpt_path)
    return trainer


def test_ema_equals_beta_recurrence(tmp_path, tiny_net_kwargs, tiny_data_kwargs):
    beta, steps = 0.8, 3
    task = JointFinetune(**tiny_net_kwargs, ema_beta=beta, weight_decay=1e-3)
    ema = {k: v.clone().double() for k, v in task.net.state_dict().items()}
    recorder = RecordAfterStep()
    fit(task, tiny_data_kwargs, tmp_path, steps, [recorder])
    assert len(recorder.states) == steps
    for state in recorder.states:  # ema_t = β ema_{t-1} + (1 − β) θ_t
        for key, value in state.items():
            ema[key] = beta * ema[key] + (1 - beta) * value.double() if value.is_floating_point() else value.double()
    result = task.ema_net.state_dict()
    for key, expected in ema.items():
        torch.testing.assert_close(result[key].double(), expected, rtol=1e-5, atol=1e-6, msg=key)
    # The net itself moved away from the EMA, and evaluation uses the EMA net.
    assert task.inference_net() is task.ema_net
    key = next(k for k in ema if "weight" in k)
    assert not torch.equal(task.net.state_dict()[key], result[key])


@pytest.mark.parametrize("warmup_steps", [0, 2])
def test_ema_state_survives_checkpoint_and_resume(tmp_path, tiny_net_kwargs, tiny_data_kwargs, warmup_steps):
    """Interrupted at step 2 and resumed to 4 == uninterrupted 4 steps, bit for bit (with a
    warm-up: interrupted exactly at its end, before the EMA copy starts)."""
    torch.manual_seed(0)
    kwargs = dict(**tiny_net_kwargs, ema_beta=0.7, weight_decay=1e-3, warmup_steps=warmup_steps)
    full = JointFinetune(**kwargs)
    start = copy.deepcopy(full.state_dict())
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    fit(full, tiny_data_kwargs, tmp_path / "a", 4, [checkpoints])
    first_half = sorted((tmp_path / "ckpt").glob("*step=2*.ckpt"))
    assert first_half, list((tmp_path / "ckpt").iterdir())
    saved = torch.load(first_half[0], weights_only=False)
    ema_states = [v for k, v in saved["callbacks"].items() if k.startswith("EMACallback")]
    assert ema_states == [{"num_updates": 2}]

    resumed = JointFinetune(**kwargs)
    resumed.load_state_dict(start)  # irrelevant after resume, but makes the start equal
    fit(resumed, tiny_data_kwargs, tmp_path / "b", 4, ckpt_path=first_half[0])
    ema_callback = next(c for c in resumed.trainer.callbacks if isinstance(c, EMACallback))
    assert ema_callback.num_updates == 4
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_ema_starts_from_the_net_as_warmup_leaves_it(tmp_path, tiny_net_kwargs, tiny_data_kwargs):
    """The EMA copy equals the net during warm-up, then averages from the net as warm-up leaves
    it, as DeFT's retentive copies do (not from the random decoder of step 0): ema = θ_W, then
    ema_t = β ema_{t-1} + (1 − β) θ_t, so β by horizon's "start point keeps β^R" holds."""
    beta, warmup, steps = 0.5, 2, 4
    task = JointFinetune(**tiny_net_kwargs, ema_beta=beta, warmup_steps=warmup, weight_decay=1e-3)
    recorder, ema_states = RecordAfterStep(), RecordAfterStep(lambda task: task.ema_net)
    fit(task, tiny_data_kwargs, tmp_path, steps, [recorder, ema_states])
    for step in range(1, warmup + 1):  # recorded before this step's EMA update: an exact copy of the step before
        assert all(torch.equal(v, recorder.states[step - 1][k]) for k, v in ema_states.states[step].items())
    ema = {k: v.double() for k, v in recorder.states[warmup - 1].items()}
    for state in recorder.states[warmup:]:
        for key, value in state.items():
            ema[key] = beta * ema[key] + (1 - beta) * value.double() if value.is_floating_point() else value.double()
    result = task.ema_net.state_dict()
    for key, expected in ema.items():
        torch.testing.assert_close(result[key].double(), expected, rtol=1e-5, atol=1e-6, msg=key)


def test_ema_beta_by_horizon_counts_the_steps_after_warmup_of_schedule_steps(tiny_net_kwargs):
    """``schedule_steps`` is the poly horizon of the whole run, warm-up included (the base task's
    T), so the EMA's run after warm-up is ``schedule_steps − warmup_steps`` steps long."""
    task = JointFinetune(**tiny_net_kwargs, ema_beta=0.9, ema_beta_reference_steps=8, warmup_steps=1,
                         schedule_steps=5)
    scheduler = task.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert scheduler.lr_lambdas[0](5) == 0.0  # the poly horizon: 5 steps, warm-up included
    task.on_train_start()
    assert task.ema_beta_used == pytest.approx(0.9 ** (8 / 4))


@pytest.mark.parametrize("frozen_bn", ["train", "eval"])
def test_warmup_freezes_encoder_and_trains_decoder(tmp_path, tiny_net_kwargs, tiny_data_kwargs, frozen_bn):
    task = JointFinetune(**tiny_net_kwargs, warmup_steps=2, warmup_frozen_bn=frozen_bn, weight_decay=1e-2)
    start = {k: v.clone() for k, v in task.net.state_dict().items()}
    recorder = RecordAfterStep()
    fit(task, tiny_data_kwargs, tmp_path, 3, [recorder])

    def changed(state, prefix, kind):
        names = dict(task.net.named_parameters()) if kind == "param" else dict(task.net.named_buffers())
        keys = [k for k in names if k.startswith(prefix) and state[k].is_floating_point()]
        return any(not torch.equal(state[k], start[k]) for k in keys)

    for state in recorder.states[:2]:  # warm-up steps
        assert not changed(state, "encoder.", "param")
        assert changed(state, "decoder.", "param")
        assert changed(state, "encoder.", "buffer") == (frozen_bn == "train")
    assert changed(recorder.states[2], "encoder.", "param")  # released after warm-up


def test_param_groups_carry_their_own_lr_and_weight_decay(tiny_net_kwargs):
    task = JointFinetune(**tiny_net_kwargs, lr=0.1, decoder_lr=0.5, weight_decay=1e-4,
                         decoder_weight_decay=1e-3, schedule_steps=10)
    optimizer = task.configure_optimizers()["optimizer"]
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert (groups["encoder"]["lr"], groups["encoder"]["weight_decay"]) == (0.1, 1e-4)
    assert (groups["decoder"]["lr"], groups["decoder"]["weight_decay"]) == (0.5, 1e-3)
    encoder_ids = {id(p) for p in task.net.encoder.parameters()}
    assert {id(p) for p in groups["encoder"]["params"]} == encoder_ids
    assert len(groups["decoder"]["params"]) == len(list(task.net.decoder.parameters()))


def test_poly_schedule_is_stepped_per_iteration(tiny_net_kwargs):
    task = JointFinetune(**tiny_net_kwargs, lr=1.0, poly_power=0.9, schedule_steps=10)
    config = task.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx((1 - 4 / 10) ** 0.9)


def test_an_ema_that_bf16_weights_cannot_hold_is_refused():
    for beta, dtype, refused in [(0.9999, torch.bfloat16, True), (0.99, torch.bfloat16, False),
                                 (0.9999, torch.float32, False)]:
        target, source = nn.Linear(4, 4).to(dtype), nn.Linear(4, 4).to(dtype)
        with torch.no_grad():
            for module, value in ((target, 1.0), (source, 1.5)):
                for param in module.parameters():
                    param.fill_(value)
        pair = EMAPair("net", target, source, beta)
        ema_update([pair])
        assert torch.equal(target.weight, torch.ones_like(target.weight)) == refused, (beta, dtype)  # rounded away
        if refused:
            with pytest.raises(ValueError, match="rounding step"):
                check_precision([pair])
        else:
            check_precision([pair])


def test_run_summary_of_a_checkpoint_evaluation_records_the_checkpoints_step(tmp_path, tiny_net_kwargs,
                                                                              tiny_data_kwargs):
    """`validate`/`test` of a checkpoint (a new `deft-lightning` process, or after fit): the
    summary's step is the checkpoint's (Lightning restores the step only when fitting); of the
    net in memory, the trainer's."""
    summary_file, data = tmp_path / "summary.json", DGSegDataModule(**tiny_data_kwargs)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=1)
    task = JointFinetune(**tiny_net_kwargs)
    fitted = fit(task, tiny_data_kwargs, tmp_path, 2, [checkpoints, RunSummary(str(summary_file))])
    step_1 = next((tmp_path / "ckpt").glob("*step=1.ckpt"))

    def step(stage):
        return json.loads(summary_file.read_text())[stage]["global_step"]

    assert step("fit") == 2
    for stage in ("validate", "test"):
        trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[RunSummary(str(summary_file))], limit_val_batches=1))
        getattr(trainer, stage)(JointFinetune(**tiny_net_kwargs), data, ckpt_path=step_1)
        assert step(stage) == 1
    fitted.test(task, data)  # the net in memory, as fit left it
    assert step("test") == 2
    fitted.validate(task, data, ckpt_path=step_1)
    assert step("validate") == 1
