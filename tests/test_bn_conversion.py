"""BN conversion (DAFT Algorithm 1): exactness, eval-mode propagation, parts, DDP, resume."""

import copy
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from conftest import TINY_NET, trainer_kwargs
from deft_lightning import DAFT, BNConversion, DGSegDataModule, SegmentationNet
from deft_lightning.callbacks import convert_bn
from deft_lightning.callbacks.bn_conversion import channel_moments

SCRIPTS = Path(__file__).parent / "scripts"


def randomise_bn(module: nn.Module, generator: torch.Generator) -> None:
    """Source statistics and affine parameters far from the identity, so conversion matters."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            size, dtype = layer.num_features, layer.weight.dtype
            layer.running_mean.copy_(torch.randn(size, generator=generator, dtype=dtype))
            layer.running_var.copy_(torch.rand(size, generator=generator, dtype=dtype) * 3 + 0.2)
            layer.weight.data.copy_(torch.randn(size, generator=generator, dtype=dtype))
            layer.bias.data.copy_(torch.randn(size, generator=generator, dtype=dtype))


def bn_inputs(net: nn.Module, batches: list[torch.Tensor]) -> dict[nn.Module, list[torch.Tensor]]:
    """Every BN layer's input for every batch, the net in eval mode (the independent reference)."""
    inputs: dict[nn.Module, list[torch.Tensor]] = {}
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [layer.register_forward_pre_hook(lambda m, args: inputs.setdefault(m, []).append(args[0].clone()))
               for layer in layers]
    net.eval()
    with torch.no_grad():
        for batch in batches:
            net(batch)
    for handle in handles:
        handle.remove()
    return inputs


def expected_statistics(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """M_t = mean_b μ_b, Σ_t = mean_b of the unbiased (1/(m − 1)) batch variance, m = N·spatial."""
    dims = [0, *range(2, inputs[0].dim())]
    means = torch.stack([z.mean(dims) for z in inputs])
    variances = torch.stack([z.var(dims, unbiased=True) for z in inputs])
    return means.mean(0), variances.mean(0)


def test_eval_function_unchanged_and_running_stats_are_target_statistics():
    generator = torch.Generator().manual_seed(0)
    net = SegmentationNet(**TINY_NET).double()
    randomise_bn(net, generator)
    batches = [torch.rand(2, 3, 32, 64, generator=generator, dtype=torch.float64) * 1.5 for _ in range(3)]
    probe = torch.rand(2, 3, 32, 64, generator=generator, dtype=torch.float64)
    reference = copy.deepcopy(net)
    inputs = bn_inputs(reference, batches)
    net.eval()
    with torch.no_grad():
        before = net(probe)

    count = convert_bn(net, [net], batches)

    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert count == len(layers) == len(inputs) > 10
    with torch.no_grad():
        after = net(probe)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
    old_layers = [m for m in reference.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer, old in zip(layers, old_layers):
        mean_t, var_t = expected_statistics(inputs[old])
        torch.testing.assert_close(layer.running_mean, mean_t, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_var, var_t, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(layer.weight, old.weight)  # γ, β really were rewritten
    assert not net.training or all(not m.training for m in net.modules())  # modes restored (eval here)


@pytest.mark.parametrize("shape", [(6, 4, 5), (5, 4, 3, 7)], ids=["BatchNorm1d", "BatchNorm2d"])
def test_statistics_come_from_each_layer_input_under_eval_propagation(shape):
    """Two stacked BN layers: the second one's target statistics are those of the first
    layer's *eval-mode* output; train-mode propagation (batch statistics) would differ."""
    bn = nn.BatchNorm1d if len(shape) == 3 else nn.BatchNorm2d
    generator = torch.Generator().manual_seed(1)
    net = nn.Sequential(bn(4), bn(4)).double()
    randomise_bn(net, generator)
    net.train()
    batches = [torch.randn(*shape, generator=generator, dtype=torch.float64) * 2 + 1 for _ in range(3)]
    source = copy.deepcopy(net).eval()

    convert_bn(net, [net], batches)

    with torch.no_grad():
        eval_inputs = [source[0](z) for z in batches]
        train_inputs = [copy.deepcopy(source[0]).train()(z) for z in batches]
    mean_t, var_t = expected_statistics(eval_inputs)
    torch.testing.assert_close(net[1].running_mean, mean_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net[1].running_var, var_t, rtol=1e-12, atol=1e-12)
    train_mean, _ = expected_statistics(train_inputs)
    assert not torch.allclose(net[1].running_mean, train_mean, atol=1e-3)
    assert net.training and net[0].training and net[1].training  # train mode restored


def thread_sum(ranks: int):
    """A ``reduce`` per simulated rank (one thread each): the sum of all ranks' tensors."""
    barrier, slots = threading.Barrier(ranks, timeout=60), [None] * ranks

    def for_rank(rank):
        def reduce(tensor):
            slots[rank] = tensor.clone()
            barrier.wait()
            total = sum(slots[1:], slots[0].clone())
            barrier.wait()
            return total
        return reduce
    return for_rank


def test_sync_batchnorm_takes_the_moments_of_the_global_batch():
    """Two ranks, one image per batch each. A SyncBatchNorm layer normalises over the global
    batch in training (both ranks' b-th images), so its Σ_t is the mean over b of the unbiased
    variance of that union, m counted over it (the pooled layer: m = 1 per rank, 2 globally);
    a plain BN layer's batch is each rank's own."""
    generator = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.SyncBatchNorm(4)).double()
    randomise_bn(net, generator)
    shards = [[torch.randn(1, 3, 5, 6, generator=generator, dtype=torch.float64) * (1 + b) + r for b in range(3)]
              for r in range(2)]
    inputs = [bn_inputs(copy.deepcopy(net), shard) for shard in shards]
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    expected = {}
    for index, layer in enumerate(layers):
        per_rank = [list(inputs[r].values())[index] for r in range(2)]  # [rank][batch]
        if isinstance(layer, nn.SyncBatchNorm):
            expected[index] = expected_statistics([torch.cat(pair) for pair in zip(*per_rank)])
        else:
            expected[index] = expected_statistics(per_rank[0] + per_rank[1])
    copies, reduce = [copy.deepcopy(net) for _ in range(2)], thread_sum(2)
    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(convert_bn, copies[r], [copies[r]], shards[r], reduce(r)) for r in range(2)]:
            done.result()

    for converted in copies:
        bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for index, layer in enumerate(bns):
            torch.testing.assert_close(layer.running_mean, expected[index][0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(layer.running_var, expected[index][1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 50), (2, 3, 20, 30), (2, 3, 4, 5, 6)])
def test_channel_moments_in_float32_match_a_float64_reference(shape):
    """Large means (cancellation-prone) and a channels-last layout, float32 in, float64 out."""
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(*shape, generator=generator) * 0.5 + 300
    if len(shape) == 4:
        z = z.contiguous(memory_format=torch.channels_last)
    mean, variance = channel_moments(z)
    dims = [0, *range(2, z.dim())]
    reference_var, reference_mean = torch.var_mean(z.double(), dim=dims, correction=0)
    assert mean.dtype == variance.dtype == torch.float64
    torch.testing.assert_close(mean, reference_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(variance, reference_var, rtol=1e-4, atol=0)


def test_model_without_batchnorm_raises_a_clear_error():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        convert_bn(net, [net], [torch.rand(2, 3, 8, 8)])


def test_layer_off_the_forward_path_raises():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    unused = nn.BatchNorm2d(4)
    with pytest.raises(RuntimeError, match="received no input"):
        convert_bn(net, [net, unused], [torch.rand(2, 3, 8, 8)])


class StateAtFirstStep(Callback):
    """The net's state right before the first optimizer step (after the conversion)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self.state = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}


@pytest.mark.parametrize("parts", [["encoder"], ["encoder", "decoder"]])
def test_callback_converts_the_selected_parts_before_the_first_step(tmp_path, tiny_data_kwargs, parts):
    torch.manual_seed(0)
    task = DAFT(**TINY_NET, bn_conversion_parts=parts, bn_conversion_batches=1, head_init="random")
    start = {k: v.clone() for k, v in task.net.state_dict().items()}
    probe = StateAtFirstStep()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=[probe]))
    trainer.fit(task, DGSegDataModule(**tiny_data_kwargs))
    converted = probe.state

    def moved(prefix):
        return any(not torch.equal(converted[k], start[k]) for k in start
                   if k.startswith(prefix) and k.endswith("running_mean"))

    assert moved("encoder.")
    assert moved("decoder.") == ("decoder" in parts)
    callback = next(c for c in trainer.callbacks if isinstance(c, BNConversion))
    assert callback.converted


def test_resume_after_conversion_does_not_convert_again(tmp_path, tiny_data_kwargs):
    """Interrupted at step 2 and resumed to 4 == uninterrupted 4 steps, bit for bit; a second
    conversion on resume would rewrite the BN layers and break the equality."""
    kwargs = dict(**TINY_NET, bn_conversion_batches=2, weight_decay=1e-3)
    torch.manual_seed(0)
    full = DAFT(**kwargs)
    start = copy.deepcopy(full.state_dict())
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    Trainer(**trainer_kwargs(tmp_path / "a", max_steps=4, callbacks=[checkpoints], enable_checkpointing=True)).fit(
        full, DGSegDataModule(**tiny_data_kwargs))
    first_half = sorted((tmp_path / "ckpt").glob("*step=2*.ckpt"))
    saved = torch.load(first_half[0], weights_only=False)
    assert [v for k, v in saved["callbacks"].items() if k.startswith("BNConversion")] == [{"converted": True}]

    resumed = DAFT(**kwargs)
    resumed.load_state_dict(start)
    Trainer(**trainer_kwargs(tmp_path / "b", max_steps=4)).fit(resumed, DGSegDataModule(**tiny_data_kwargs),
                                                               ckpt_path=first_half[0])
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.mark.slow  # two processes start and import everything: ~45 s on the 2-core CPU
def test_two_process_ddp_converts_identically_and_equals_single_process_on_the_union(tmp_path):
    """Each rank converts from its own shard; the reduced statistics are those of all shards."""
    sys.path.insert(0, str(SCRIPTS))
    from ddp_bn_conversion import DDP_DATA, TASK_KWARGS, shard_batches, shard_indices

    result = subprocess.run([sys.executable, str(SCRIPTS / "ddp_bn_conversion.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shards = [json.loads((tmp_path / f"shard{r}.json").read_text()) for r in range(2)]
    assert shards == [shard_indices(r) for r in range(2)] and shards[0] != shards[1]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 10
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key

    initial = torch.load(tmp_path / "initial.pt")
    task = DAFT(**TASK_KWARGS)
    task.net.load_state_dict(initial)
    datamodule = DGSegDataModule(**DDP_DATA)
    datamodule.setup("fit")
    batches = [batch for rank in range(2) for batch in shard_batches(datamodule.train_set, rank)]
    convert_bn(task.net, task.bn_conversion_modules(), batches)
    single = task.net.state_dict()
    for key, value in ranks[0].items():
        assert not torch.equal(value, initial[key]), key  # converted
        torch.testing.assert_close(value, single[key], rtol=1e-5, atol=1e-6, msg=key)
