"""channels_last and compile switches: what they convert, and that training gives the same
numbers as the plain contiguous/eager run (DeFT's four components, EMA and BN conversion
included)."""

import warnings

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from conftest import TINY_NET, trainer_kwargs
from deft_lightning import DAFT, DeFT, DGSegDataModule, JointFinetune
from deft_lightning.speedups import RegionsCompiler, use_channels_last

DEFT = dict(warmup_steps=1, beta_encoder=0.5, beta_decoder=0.5)
STAGE_2 = dict(DEFT, warmup_steps=0)  # no recompilation when the encoder is released
COMPONENTS = ("adaptive_encoder", "retentive_decoder", "retentive_encoder", "adaptive_decoder")


class InputFormats(Callback):
    """Records whether every encoder input during training was channels_last."""

    def __init__(self):
        self.channels_last: list[bool] = []

    def on_train_start(self, trainer, pl_module):
        encoder = pl_module.trainable_modules()[0]
        encoder.register_forward_pre_hook(
            lambda module, args: self.channels_last.append(
                args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))


def fit(task, root, data_kwargs, steps=3, callbacks=()):
    torch.manual_seed(0)  # the same random draws (DeFT's LAB style augmentation) in both runs
    trainer = Trainer(**trainer_kwargs(root, max_steps=steps, callbacks=list(callbacks)))
    trainer.fit(task, DGSegDataModule(**data_kwargs))
    return trainer


def four_d_params(task):
    return [p for p in task.parameters() if p.dim() == 4]


def assert_states_close(a, b, atol=1e-4):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key, value in state_a.items():
        if torch.is_tensor(value) and value.is_floating_point():
            torch.testing.assert_close(value, state_b[key], atol=atol, rtol=1e-3, msg=key)


def test_channels_last_default_follows_the_device():
    assert use_channels_last(None, torch.device("cuda", 0)) and use_channels_last(None, torch.device("cpu"))
    assert not use_channels_last(None, torch.device("mps"))
    assert use_channels_last(True, torch.device("cpu")) and not use_channels_last(False, torch.device("cuda"))


@pytest.mark.parametrize("task_class, kwargs", [
    (DeFT, DEFT),
    (DAFT, dict(bn_conversion=True, bn_conversion_batches=1)),
], ids=["deft", "daft_bn_conversion"])
def test_channels_last_converts_every_net_and_input_and_trains_like_contiguous(
        tmp_path, tiny_data_kwargs, task_class, kwargs):
    torch.manual_seed(0)
    fast = task_class(**TINY_NET, **kwargs)  # the default: on for CPU
    plain = task_class(**TINY_NET, channels_last=False, **kwargs)
    plain.load_state_dict(fast.state_dict())
    formats = InputFormats()
    fit(fast, tmp_path / "fast", tiny_data_kwargs, steps=2, callbacks=[formats])
    fit(plain, tmp_path / "plain", tiny_data_kwargs, steps=2)

    assert fast.uses_channels_last and not plain.uses_channels_last
    assert formats.channels_last and all(formats.channels_last)
    params = four_d_params(fast)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in params)
    assert any(not p.is_contiguous() for p in params)  # 1x1 kernels are both; 3x3 ones are not
    assert all(p.is_contiguous() for p in four_d_params(plain))
    if task_class is DeFT:
        for name in COMPONENTS:  # all four components, the retentive ones included
            weights = [p for p in getattr(fast, name).parameters() if p.dim() == 4]
            assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights), name
    assert_states_close(fast, plain)


# ---- compile -------------------------------------------------------------------------------------
# The "eager" backend traces every region with dynamo and runs the captured graphs as they are,
# without code generation: the regional-compile machinery at a fraction of inductor's compile time.
CHEAP = {"backend": "eager"}


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("this backend always fails")


torch._dynamo.register_backend(failing_backend, name="deft_lightning_test_failing")


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\(\)`")
def test_compile_compiles_deft_four_components_and_trains_like_eager():
    torch.manual_seed(0)
    compiled = DeFT(**TINY_NET, compile_options=CHEAP, **STAGE_2)
    eager = DeFT(**TINY_NET, **STAGE_2)
    eager.load_state_dict(compiled.state_dict())
    compiled.compiler = RegionsCompiler(CHEAP)  # what setup() does with compile=True
    compiled.compiler.compile(compiled.compile_regions())
    images, masks = torch.rand(2, 3, 64, 64), torch.randint(0, 19, (2, 64, 64))
    losses = [task.training_loss(images, masks) for task in (compiled, eager)]
    for loss in losses:
        loss.backward()

    regions = [getattr(compiled, name) for name in COMPONENTS]
    assert compiled.compiler.modules == regions
    assert all(module._compiled_call_impl is not None for module in regions)
    assert compiled.compiler.fallback_reason is None and compiled.compiler.compile_seconds > 0
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys
    torch.testing.assert_close(losses[0], losses[1])
    for name in ("adaptive_encoder", "adaptive_decoder"):  # the gradients of both pathways
        for (key, a), b in zip(getattr(compiled, name).named_parameters(), getattr(eager, name).parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=f"{name}.{key}")


def test_compile_failure_falls_back_to_eager_with_one_warning(tmp_path, tiny_data_kwargs):
    torch.manual_seed(0)
    task = JointFinetune(**TINY_NET, compile=True, compile_options={"backend": "deft_lightning_test_failing"})
    eager = JointFinetune(**TINY_NET)
    eager.load_state_dict(task.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(task, tmp_path / "failing", tiny_data_kwargs, steps=2)
    messages = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert len(messages) == 1 and "training continues in eager mode" in messages[0]
    assert all(module._compiled_call_impl is None for module in task.compiler.modules)
    fit(eager, tmp_path / "eager", tiny_data_kwargs, steps=2)
    assert_states_close(task, eager, atol=1e-6)


@pytest.mark.slow
def test_inductor_compile_of_a_tiny_net_trains_like_eager(tmp_path, tiny_data_kwargs):
    """The real default backend (C++ code generation on CPU): minutes on a shared 2-core CPU."""
    torch.manual_seed(0)
    compiled = JointFinetune(**TINY_NET, compile=True)
    eager = JointFinetune(**TINY_NET)
    eager.load_state_dict(compiled.state_dict())
    fit(compiled, tmp_path / "compiled", tiny_data_kwargs, steps=2)
    fit(eager, tmp_path / "eager", tiny_data_kwargs, steps=2)
    assert compiled.compiler.fallback_reason is None
    assert_states_close(compiled, eager, atol=1e-4)
