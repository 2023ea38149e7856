"""Layer-wise merging (merging.py) and `merge` (merge_checkpoints.py), in process.

Weights and BN statistics are checked against values computed here, independently of the
library: layer indices from ``named_modules()``, the anchor formula written out, the mixture
variance in float64 closed form.
"""

import copy
import functools
import json

import pytest
import segmentation_models_pytorch as smp
import torch

from conftest import TINY_NET
from deft_lightning import DAFT, DeFT, FisherTune, JointFinetune, SegmentationNet
from deft_lightning.export import export
from deft_lightning.merge_checkpoints import merge, newest_checkpoints
from deft_lightning.merging import MergeError, load_net_state, merge_layerwise

NET = {key: value for key, value in TINY_NET.items() if key != "encoder_weights"}


@functools.cache
def _template(config: str) -> SegmentationNet:
    return SegmentationNet(**{**NET, **json.loads(config)})


def random_net(seed: int, **overrides) -> SegmentationNet:
    """A tiny net with random weights and random BN running statistics."""
    net = copy.deepcopy(_template(json.dumps(overrides, sort_keys=True)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0, generator=generator)
            elif name.endswith("num_batches_tracked"):
                tensor.fill_(seed + 1)
            elif "." in name:  # not the input normalisation
                tensor.normal_(generator=generator)
    return net


def layers(net: torch.nn.Module) -> list[str]:
    """Modules holding tensors of their own, in registration order, the net itself excluded."""
    return [name for name, module in net.named_modules() if name and
            (list(module.parameters(recurse=False)) or list(module.buffers(recurse=False)))]


def constant_state(net: SegmentationNet, value: float) -> dict[str, torch.Tensor]:
    return {key: torch.full_like(t, value) if t.is_floating_point() and "." in key else t.clone()
            for key, t in net.state_dict().items()}


def test_identical_inputs_merge_to_exactly_the_same_weights():
    state = random_net(0).state_dict()
    for mode, anchor in (("layerwise", 2), ("uniform", 0)):
        merged = merge_layerwise([state] * 3, anchor=anchor, power=2.0, anchor_max=0.8, mode=mode)
        assert list(merged) == list(state)
        for key, value in state.items():
            assert merged[key].dtype == value.dtype and torch.equal(merged[key], value), (mode, key)


def test_uniform_equals_the_plain_mean():
    states = [random_net(seed).state_dict() for seed in range(3)]
    merged = merge_layerwise(states, anchor=1, mode="uniform")
    for key, value in merged.items():
        if key.endswith("running_var") or not value.is_floating_point():
            continue
        torch.testing.assert_close(value, torch.stack([s[key] for s in states]).mean(0), rtol=1e-6, atol=1e-6)
    assert torch.equal(merged["encoder.bn1.num_batches_tracked"], states[1]["encoder.bn1.num_batches_tracked"])


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_per_layer_weights_follow_the_formula(power):
    """Input k is the constant k-hot: the merged value of a tensor is input k's weight there."""
    net, num_models, anchor, anchor_max = random_net(0), 3, 1, 0.9
    names = layers(net)
    for k in range(num_models):
        states = [constant_state(net, 1.0 if j == k else 0.0) for j in range(num_models)]
        merged = merge_layerwise(states, anchor=anchor, power=power, anchor_max=anchor_max)
        for index in (0, len(names) // 2, len(names) - 1):
            t = index / (len(names) - 1)
            w_anchor = 1 / num_models + (anchor_max - 1 / num_models) * t**power
            expected = w_anchor if k == anchor else (1 - w_anchor) / (num_models - 1)
            value = merged[f"{names[index]}.weight"]
            torch.testing.assert_close(value, torch.full_like(value, expected), rtol=1e-6, atol=1e-7)
    assert names[0] == "encoder.conv1" and names[-1].startswith("decoder.head")


def test_merged_bn_variance_is_the_variance_of_the_mixture():
    nets = [random_net(seed) for seed in range(3)]
    states = [net.state_dict() for net in nets]
    anchor, power, anchor_max = 2, 1.0, 1.0
    merged = merge_layerwise(states, anchor=anchor, power=power, anchor_max=anchor_max)
    names = layers(nets[0])
    for index, name in enumerate(names):
        if f"{name}.running_var" not in merged:
            continue
        t = index / (len(names) - 1)
        w_anchor = 1 / 3 + (anchor_max - 1 / 3) * t**power
        w = [w_anchor if k == anchor else (1 - w_anchor) / 2 for k in range(3)]
        mu = [s[f"{name}.running_mean"].double() for s in states]
        var = [s[f"{name}.running_var"].double() for s in states]
        mixture_mean = sum(wk * m for wk, m in zip(w, mu))
        mixture_var = sum(wk * (v + m**2) for wk, v, m in zip(w, var, mu)) - mixture_mean**2
        torch.testing.assert_close(merged[f"{name}.running_mean"].double(), mixture_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged[f"{name}.running_var"].double(), mixture_var, rtol=1e-5, atol=1e-6)
        if 0 < t < 1:  # the mixture is wider than the weighted mean of the variances
            assert (merged[f"{name}.running_var"].double() > sum(wk * v for wk, v in zip(w, var)) + 1e-6).any()


def test_samples_from_the_mixture_have_the_merged_variance():
    """Sampling the weighted mixture of the BN layers' Gaussians gives the merged statistics."""
    states = [random_net(seed).state_dict() for seed in range(2)]
    merged = merge_layerwise(states, mode="uniform")
    key = "encoder.bn1"
    generator = torch.Generator().manual_seed(0)
    samples = torch.cat([s[f"{key}.running_mean"] + s[f"{key}.running_var"].sqrt()
                         * torch.randn(50_000, s[f"{key}.running_mean"].numel(), generator=generator)
                         for s in states])
    torch.testing.assert_close(samples.var(0), merged[f"{key}.running_var"], rtol=0.03, atol=0.0)


def save_state(net: SegmentationNet, path) -> str:
    torch.save(net.state_dict(), path)
    return str(path)


def test_mismatched_architectures_fail_naming_the_checkpoint_and_key_and_write_nothing(tmp_path):
    anchor = save_state(random_net(0), tmp_path / "anchor.pt")
    other = random_net(1, arch_kwargs={"encoder_depth": 3, "decoder_channels": [32, 16, 4]})
    other_path = save_state(other, tmp_path / "other.pt")
    reference = random_net(0).state_dict()
    first = next(key for key, value in reference.items()
                 if key not in other.state_dict() or other.state_dict()[key].shape != value.shape)
    out = tmp_path / "merged.ckpt"
    with pytest.raises(MergeError) as error:
        merge(checkpoints=[anchor, other_path], out=str(out), net=NET)
    assert "other.pt" in str(error.value) and repr(first) in str(error.value)
    assert "encoders match" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anchor.pt", "other.pt"]

    renamed = {key.replace("encoder.layer2.0.conv1", "encoder.layer2.0.convX"): value
               for key, value in random_net(1).state_dict().items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(MergeError, match=r"renamed\.pt.*'encoder\.layer2\.0\.conv1\.weight'"):
        merge(checkpoints=[anchor, str(tmp_path / "renamed.pt")], out=str(out), net=NET)
    assert not out.exists()


def test_shared_encoder_merge_of_two_decoders_keeps_the_anchors_decoder(tmp_path):
    unet, fpn = random_net(0), random_net(1, arch="FPN", arch_kwargs={"encoder_depth": 3, "decoder_segmentation_channels": 32,
                                                                      "decoder_pyramid_channels": 32})
    with pytest.raises(MergeError, match="first differing key"):
        merge_layerwise([fpn.state_dict(), unet.state_dict()])
    merged = merge_layerwise([fpn.state_dict(), unet.state_dict()], anchor=0, parts="encoder")
    fpn_state, unet_state = fpn.state_dict(), unet.state_dict()
    assert list(merged) == list(fpn_state)
    for key, value in fpn_state.items():
        if not key.startswith("encoder."):
            assert torch.equal(merged[key], value), key
    # Depth 0 (the stem) is a plain average; a later encoder layer leans toward the anchor.
    torch.testing.assert_close(merged["encoder.conv1.weight"], (fpn_state["encoder.conv1.weight"]
                                                                + unet_state["encoder.conv1.weight"]) / 2)
    key = "encoder.layer2.1.conv2.weight"
    assert not torch.allclose(merged[key], (fpn_state[key] + unet_state[key]) / 2)
    merged_net = copy.deepcopy(fpn)
    merged_net.load_state_dict(merged)
    assert merged_net(torch.rand(1, 3, 64, 64)).shape == (1, 19, 64, 64)


def task_checkpoint(task, path, global_step=0) -> str:
    """What a Lightning checkpoint of a deft-lightning task holds, for loading (no training)."""
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "global_step": global_step,
                "task_class": f"{type(task).__module__}.{type(task).__qualname__}"}, path)
    return str(path)


def randomize(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and "input_" not in key:
                tensor.copy_(torch.randn(tensor.shape, generator=generator))


@pytest.mark.parametrize("method", ["joint", "joint_ema", "deft", "daft", "fishertune"])
def test_task_checkpoints_merge_through_their_inference_net(tmp_path, method):
    if method == "deft":
        task = DeFT(**TINY_NET, final_model="II")
        task.stage = 2
    else:
        task = {"joint": lambda: JointFinetune(**TINY_NET), "joint_ema": lambda: JointFinetune(**TINY_NET, ema_beta=0.9),
                "daft": lambda: DAFT(**TINY_NET), "fishertune": lambda: FisherTune(**TINY_NET, ema_beta=0.9)}[method]()
    randomize(task, 0)
    path = task_checkpoint(task, tmp_path / "task.ckpt")
    expected = task.inference_net().state_dict()
    loaded = load_net_state(path)
    assert list(loaded.state) == list(expected)
    assert all(torch.equal(loaded.state[key], value) for key, value in expected.items())
    if method == "deft":  # the final pair II: adaptive encoder e1, retentive decoder d~1
        assert torch.equal(loaded.state["encoder.conv1.weight"], task.adaptive_encoder.conv1.weight)
        assert torch.equal(loaded.state["decoder.head.0.weight"], task.retentive_decoder.head[0].weight)
    if method in ("joint_ema", "fishertune"):
        assert torch.equal(loaded.state["encoder.conv1.weight"], task.ema_net.encoder.conv1.weight)
    if method != "deft":
        return
    # The exported smp folder is the same input.
    export(ckpt_path=path, out=str(tmp_path / "exported"))
    exported = load_net_state(tmp_path / "exported").state
    assert list(exported) == list(expected)
    assert all(torch.equal(exported[key], value) for key, value in expected.items())


def test_merged_checkpoint_holds_the_merge_and_loads_as_a_task(tmp_path):
    tasks = [JointFinetune(**TINY_NET, ema_beta=0.9), DeFT(**TINY_NET), DAFT(**TINY_NET)]
    paths = []
    for seed, task in enumerate(tasks):
        randomize(task, seed)
        task.stage = 2
        paths.append(task_checkpoint(task, tmp_path / f"{seed}.ckpt"))
    out = merge(checkpoints=paths, anchor=paths[1], power=2.0, out=str(tmp_path / "merged.ckpt"))
    expected = merge_layerwise(paths, anchor=1, power=2.0)
    task = JointFinetune.load_from_checkpoint(out)
    assert all(torch.equal(task.net.state_dict()[key], value) for key, value in expected.items())
    assert torch.load(out, weights_only=True)["merge"]["anchor"] == paths[1]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_wise_interpolates_the_encoder_toward_its_pretrained_weights(tmp_path):
    torch.manual_seed(5)  # a whole ResNet-18 encoder, as a weights file holds it
    encoder = smp.create_model("Unet", "resnet18", encoder_weights=None).encoder
    torch.save(encoder.state_dict(), tmp_path / "encoder.pt")
    task = JointFinetune(**{**TINY_NET, "encoder_weights": str(tmp_path / "encoder.pt")})
    start = {f"encoder.{key}": value.clone() for key, value in task.net.encoder.state_dict().items()}
    assert torch.equal(start["encoder.conv1.weight"], encoder.conv1.weight)
    randomize(task, 1)
    path = task_checkpoint(task, tmp_path / "finetuned.ckpt")
    finetuned = task.net.state_dict()
    for alpha in (0.0, 0.3):
        merged = merge_layerwise([path], mode="wise", alpha=alpha)
        for key, value in merged.items():
            if key.startswith("encoder.") and value.is_floating_point() and not key.endswith("running_var"):
                torch.testing.assert_close(value, (1 - alpha) * start[key] + alpha * finetuned[key])
            elif not key.startswith("encoder.") or not value.is_floating_point():
                assert torch.equal(value, finetuned[key]), key
    with pytest.raises(MergeError, match="randomly initialised encoder"):
        merge_layerwise([task_checkpoint(JointFinetune(**TINY_NET), tmp_path / "random.ckpt")], mode="wise")


def test_last_picks_the_newest_checkpoints_of_a_run_once_per_step(tmp_path):
    task = JointFinetune(**TINY_NET)
    for step in (10, 20, 30):
        task_checkpoint(task, tmp_path / f"step={step}.ckpt", step)
    task_checkpoint(task, tmp_path / "last.ckpt", 30)
    paths = sorted(str(p) for p in tmp_path.glob("*.ckpt"))
    assert newest_checkpoints(paths, 2) == [str(tmp_path / "last.ckpt"), str(tmp_path / "step=20.ckpt")]
    with pytest.raises(MergeError, match="only 3 checkpoint"):
        newest_checkpoints(paths, 4)


def test_command_line_merges_and_fails_in_one_line(tmp_path, capsys):
    """`deft-lightning merge --checkpoints a b c --anchor c --out ...` (README), and a bad input."""
    from deft_lightning.cli import main

    paths = []
    for seed in range(3):
        task = JointFinetune(**TINY_NET)
        randomize(task, seed)
        paths.append(task_checkpoint(task, tmp_path / f"{'abc'[seed]}.ckpt"))
    out = tmp_path / "merged.ckpt"
    main(["merge", "--checkpoints", *paths, "--anchor", paths[2], "--out", str(out)])
    expected = merge_layerwise(paths, anchor=2)
    merged = torch.load(out, weights_only=True)
    assert merged["merge"]["anchor"] == paths[2]
    assert all(torch.equal(merged["state_dict"][f"net.{key}"], value) for key, value in expected.items())
    with pytest.raises(SystemExit) as error:
        main(["merge", "--checkpoints", paths[0], str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x.ckpt")])
    assert "missing.ckpt does not exist" in str(error.value) and not (tmp_path / "x.ckpt").exists()


def test_a_safetensors_anchor_merges_in_its_nets_registration_order(tmp_path):
    """safetensors files keep their tensors sorted by name (``decoder.*`` before ``encoder.*``),
    not in the net's order: the layer-wise depth comes from ``net``, or the merge is refused."""
    from safetensors.torch import save_file

    states = [random_net(seed).state_dict() for seed in range(3)]
    paths = []
    for seed, state in enumerate(states):
        save_file({key: value.contiguous() for key, value in state.items()}, tmp_path / f"{seed}.safetensors")
        paths.append(str(tmp_path / f"{seed}.safetensors"))
    expected = merge_layerwise(states, anchor=0)
    out = merge(checkpoints=paths, net=NET, out=str(tmp_path / "merged.ckpt"))
    merged = torch.load(out, weights_only=True)["state_dict"]
    assert all(torch.equal(merged[f"net.{key}"], value) for key, value in expected.items())
    with pytest.raises(MergeError, match=r"0\.safetensors.*registration order.*net"):
        merge_layerwise(paths)
    uniform = merge_layerwise(paths, mode="uniform")  # no depth: any order merges alike
    assert all(torch.equal(uniform[key], value) for key, value in merge_layerwise(states, mode="uniform").items())
