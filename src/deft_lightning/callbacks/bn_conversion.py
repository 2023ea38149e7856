"""DAFT's batch-normalisation conversion (Algorithm 1), once before the first training step.

With the network in eval mode every BN layer still normalises with its source statistics
``(M_s, Σ_s)``, so each layer sees the input the unchanged eval-mode network gives it. A
forward pre-hook records, for every calibration batch ``b``, the channel mean ``μ_b`` and the
biased variance ``σ²_b`` (divisor ``m_b``) of the layer's *input*. Then (Eq. 3 and 5)

    M_t = mean_b μ_b                    Σ_t = mean_b m_b/(m_b − 1) · σ²_b
    γ_t = γ_s · sqrt(Σ_t + ε) / sqrt(Σ_s + ε)
    β_t = β_s + γ_s · (M_t − M_s) / sqrt(Σ_s + ε)

and the running statistics become ``(M_t, Σ_t)``. In eval mode a converted layer computes
``γ_t (z − M_t)/sqrt(Σ_t + ε) + β_t = γ_s (z − M_s)/sqrt(Σ_s + ε) + β_s`` (Eq. 4): the eval-mode
function of the network is unchanged, while finetuning in train mode starts from parameters
and statistics that already match the target batches.

``m_b`` is the number of elements per channel in batch ``b`` as PyTorch counts them for its own
unbiased running variance: ``N·H·W`` for ``BatchNorm2d`` (``N·L`` or ``N`` for 1d, ``N·D·H·W``
for 3d). With equal batches (the train loader drops the last one) ``Σ_t`` is the paper's
``m/(m − 1) · mean_b σ²_b``. Per-batch moments are computed in the input's precision (float32
at least, see :func:`channel_moments`) and summed in float64; the conversion itself is done in
float64.

Under DDP each rank runs its own shard of the training data and every rank converts with the
same ``(M_t, Σ_t)``. A batch is what the layer normalises over in training: for a plain BN layer
each rank's own batch (per-layer sums and batch counts all-reduced once, after the pass: the
mean over the union of all ranks' batches); for a ``SyncBatchNorm`` layer (``sync_batchnorm:
true``) the global batch, the ranks' ``b``-th batches together (moments all-reduced after every
forward, ``m_b`` counted over all ranks), as PyTorch's SyncBatchNorm counts it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

Reduce = Callable[[Tensor], Tensor]


def batchnorm_layers(modules: Iterable[nn.Module]) -> dict[str, _BatchNorm]:
    """Every BatchNorm layer (SyncBatchNorm included) inside ``modules``, by qualified name;
    a layer reachable from two of the modules is listed once."""
    layers: dict[str, _BatchNorm] = {}
    seen: set[int] = set()
    for index, module in enumerate(modules):
        for name, layer in module.named_modules(prefix=f"{index}"):
            if isinstance(layer, _BatchNorm) and id(layer) not in seen:
                if not (layer.affine and layer.track_running_stats):
                    raise ValueError(f"BN conversion needs affine BN layers with running statistics; "
                                     f"{name} has affine={layer.affine}, "
                                     f"track_running_stats={layer.track_running_stats}")
                seen.add(id(layer))
                layers[name] = layer
    return layers


def channel_moments(z: Tensor) -> tuple[Tensor, Tensor]:
    """Channel mean and biased variance (divisor ``m``) of a BN input ``(N, C, *)``, in float64.

    Two passes over each (sample, channel) row in the input's precision (float32 at least):
    row means, then the norm of the rows' deviations; the rows are then combined exactly in
    float64 (Chan et al.'s parallel formula, equal row sizes). Three full-size ops, each a
    contiguous inner-dimension reduction or elementwise op that vectorises on CPU: about 10x
    faster single-threaded than ``torch.var_mean`` over dims (0, 2, 3), at a relative error
    of ~1e-7 in float32.
    """
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    rows = z.reshape(z.shape[0], z.shape[1], -1)
    size = rows.shape[2]
    row_means = rows.mean(2, keepdim=True)
    row_m2 = torch.linalg.vector_norm(rows - row_means, dim=2).double().square()
    row_means = row_means.squeeze(2).double()
    mean = row_means.mean(0)
    variance = (row_m2.sum(0) + size * (row_means - mean).square().sum(0)) / (rows.shape[0] * size)
    return mean, variance


@torch.no_grad()
def target_statistics(net: nn.Module, layers: dict[str, _BatchNorm], batches: Iterable[Any],
                      reduce: Reduce | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """``(M_t, Σ_t)`` in float64 for every layer, from one eval-mode forward of ``net`` per batch.

    ``batches`` are whatever ``net`` takes. ``reduce`` sums a float64 tensor across processes
    (DDP). A layer's batch is the one it normalises over in training: this process's batch for
    a plain BN layer (its per-layer sums and batch counts are reduced once, after the pass), the
    global batch for a ``SyncBatchNorm`` layer (its moments are combined across processes after
    every forward, so every process must run the same number of batches).
    """
    sums = {name: [torch.zeros(layer.num_features, dtype=torch.float64, device=layer.running_mean.device)
                   for _ in range(2)] for name, layer in layers.items()}
    counts = dict.fromkeys(layers, 0)
    synced = {name for name, layer in layers.items() if isinstance(layer, nn.SyncBatchNorm)}
    pending: list[tuple[str, int, Tensor, Tensor]] = []  # this forward's moments of the synced layers

    def add(name: str, m: int, mean: Tensor, variance: Tensor) -> None:
        if m < 2:
            raise ValueError(f"BN conversion of {name}: one element per channel in a batch; "
                             f"the unbiased variance needs m >= 2")
        sums[name][0] += mean
        sums[name][1] += variance * (m / (m - 1))
        counts[name] += 1

    def record(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(layer: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            z = inputs[0]
            moments = (name, z.numel() // z.shape[1], *channel_moments(z))
            if name in synced:
                pending.append(moments)
            else:
                add(*moments)
        return hook

    def add_global_batch() -> None:
        # Sums about the source mean c (the same on every process, close to the data's mean):
        # S1 = Σ (z − c) = m (μ − c), S2 = Σ (z − c)² = m (σ² + (μ − c)²), and m, over processes.
        shifts = [mean - layers[name].running_mean.double() for name, _, mean, _ in pending]
        flat = torch.cat([part for (_, m, _, variance), shift in zip(pending, shifts)
                          for part in (m * shift, m * (variance + shift.square()))]
                         + [shifts[0].new_tensor([float(m) for _, m, _, _ in pending])])
        if reduce is not None:
            flat = reduce(flat)
        offset, sizes = 0, flat[-len(pending):].tolist()
        for (name, _, _, _), m in zip(pending, sizes):
            size = layers[name].num_features
            shift = flat[offset:offset + size] / m
            variance = (flat[offset + size:offset + 2 * size] / m - shift.square()).clamp_min(0)
            add(name, int(m), shift + layers[name].running_mean.double(), variance)
            offset += 2 * size
        pending.clear()

    modes = {module: module.training for module in net.modules()}
    handles = [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()]
    net.eval()
    try:
        for batch in batches:
            net(batch)
            if pending:
                add_global_batch()
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training

    names = [name for name in layers if name not in synced]
    if names:
        flat = torch.cat([torch.cat(sums[name]) for name in names]
                         + [torch.tensor([float(counts[name]) for name in names], dtype=torch.float64,
                                         device=sums[names[0]][0].device)])
        if reduce is not None:
            flat = reduce(flat)
        offset = 0
        for name, count in zip(names, flat[-len(names):].tolist()):
            size = layers[name].num_features
            sums[name], counts[name] = [flat[offset:offset + size], flat[offset + size:offset + 2 * size]], count
            offset += 2 * size
    unseen = [name for name in layers if counts[name] == 0]
    if unseen:
        raise RuntimeError(f"BN conversion: {len(unseen)} BN layer(s) received no input during the "
                           f"calibration forwards (not on the forward path, or no batches): {unseen[:5]}")
    return {name: (sums[name][0] / counts[name], sums[name][1] / counts[name]) for name in layers}


@torch.no_grad()
def convert_batchnorm(layer: _BatchNorm, mean_t: Tensor, var_t: Tensor) -> None:
    """Eq. 5: rewrite ``γ, β`` for the target statistics and install ``(M_t, Σ_t)``, in float64."""
    # Copies: the source values must survive the in-place writes below (float64 layers too).
    mean_s, var_s, gamma_s, beta_s = (tensor.to(torch.float64, copy=True) for tensor in
                                      (layer.running_mean, layer.running_var, layer.weight, layer.bias))
    source_scale = torch.sqrt(var_s + layer.eps)
    layer.weight.copy_(gamma_s * torch.sqrt(var_t + layer.eps) / source_scale)
    layer.bias.copy_(beta_s + gamma_s * (mean_t - mean_s) / source_scale)
    layer.running_mean.copy_(mean_t)
    layer.running_var.copy_(var_t)


def convert_bn(net: nn.Module, modules: Iterable[nn.Module], batches: Iterable[Any],
               reduce: Reduce | None = None) -> int:
    """Algorithm 1: convert every BN layer inside ``modules`` (parts of ``net``) to the target
    statistics of ``batches`` fed through ``net``. Returns the number of converted layers.

    Raises ``ValueError`` when ``modules`` hold no BatchNorm layer: a conversion that silently
    does nothing would make a "with BN conversion" result meaningless.
    """
    layers = batchnorm_layers(modules)
    if not layers:
        raise ValueError("BN conversion: the modules to convert contain no BatchNorm layer; "
                         "turn the conversion off for this network (DAFT: bn_conversion=False)")
    for name, (mean_t, var_t) in target_statistics(net, layers, batches, reduce).items():
        convert_batchnorm(layers[name], mean_t, var_t)
    return len(layers)


class BNConversion(Callback):
    """Algorithm 1 once, at the start of training, on ``num_batches`` training batches.

    Images (the ``image`` entry of the library's dict batches) come from the trainer's train
    dataloader (a fresh pass; under DDP each rank's own shard) and go through the task's
    ``inference_net()`` in eval mode, with the trainer's precision (input conversion and
    autocast). The layers converted are the BN layers of the task's
    ``bn_conversion_modules()`` when it has that hook, else of the whole
    ``inference_net()``. The global CPU RNG is saved and restored around the pass. With the
    library's datamodule the training batches are the same as without conversion (order and
    every sample's draws are seeded from ``(seed, epoch, index)``,
    :mod:`~deft_lightning.data.resumable`); another loader whose augmentation generator lives
    on across passes (or whose ``generator`` seeds its workers) does advance.

    The callback checkpoints ``converted``: a run resumed after the conversion does not
    convert again (its weights are already converted in the checkpoint).

    Args:
        num_batches: calibration batches per process; ``None`` makes one full pass over the
            training data, as Algorithm 1 does.
    """

    def __init__(self, num_batches: int | None = None) -> None:
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
        self.num_batches = num_batches
        self.converted = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.converted:
            return
        net = pl_module.inference_net()
        hook = getattr(pl_module, "bn_conversion_modules", None)
        modules = hook() if hook is not None else [net]
        precision = trainer.precision_plugin
        input_format = getattr(pl_module, "input_images", None)  # channels_last when the task uses it

        def images() -> Iterable[Tensor]:
            for batch in islice(trainer.train_dataloader, self.num_batches):
                images = batch["image"].to(pl_module.device)
                yield precision.convert_input(input_format(images) if input_format else images)

        # Eager even when the task compiled its nets: the calibration hooks run inside them.
        with torch.random.fork_rng(devices=[]), precision.forward_context(), torch.compiler.set_stance("force_eager"):
            count = convert_bn(net, modules, images(),
                               reduce=lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum"))
        self.converted = True
        rank_zero_info(f"BN conversion: {count} BatchNorm layers converted to the training data's statistics")

    def state_dict(self) -> dict[str, Any]:
        return {"converted": self.converted}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.converted = state_dict["converted"]
