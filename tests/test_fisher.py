"""fisher.py: the diagonal Fisher against independent computations, the feature shift, ΔF/DR-FIM by
hand, and the variational estimate at its known optimum."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_NET
from deft_lightning import SegmentationNet
from deft_lightning.fisher import (delta_fisher, diagonal_fisher, dr_fim, encoder_feature_maps, entry_ranks, feature_shift,
                                   lab_style_shift, sample_labels, segmentation_loss, select_entries, variational_dr_fim,
                                   variational_precision)

CLASSES = 4


def batches(seed=0, count=2, size=4, channels=3, hw=(5, 6), ignore=True, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        images = torch.rand(size, channels, *hw, generator=gen, dtype=dtype)
        labels = torch.randint(0, CLASSES, (size, *hw), generator=gen)
        if ignore:
            labels[torch.rand(size, *hw, generator=gen) < 0.3] = 255
            labels[0, 0] = 255  # a row with many ignored pixels
        out.append((images, labels))
    return out


def true_labels(model, data, seed):
    """The labels diagonal_fisher draws for the true Fisher: same generator, same order."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return [(images, sample_labels(model(images), gen)) for images, _ in data]


def linear_softmax_fisher(weight, bias, data):
    """Closed form for a 1x1-conv softmax model: per image g_W = mean_p (softmax_p − onehot_p) x_pᵀ."""
    sums_w, sums_b, n = torch.zeros_like(weight), torch.zeros_like(bias), 0
    for images, labels in data:
        for x, y in zip(images, labels):
            pixels = x.flatten(1).T  # (P, C)
            probs = (pixels @ weight.view(CLASSES, -1).T + bias).softmax(-1)
            keep = y.flatten() != 255
            residual = probs[keep] - F.one_hot(y.flatten()[keep], CLASSES).double()
            count = max(int(keep.sum()), 1)
            g_w = (residual.T @ pixels[keep]) / count
            g_b = residual.sum(0) / count
            sums_w += g_w.square().view_as(weight)
            sums_b += g_b.square()
            n += 1
    return sums_w / n, sums_b / n


@pytest.mark.parametrize("labels", ["empirical", "true"])
@pytest.mark.parametrize("chunk_size", [1, 3])
def test_fisher_of_a_linear_softmax_model_equals_the_closed_form(labels, chunk_size):
    torch.manual_seed(0)
    model = nn.Conv2d(3, CLASSES, 1).double()
    data = batches()
    fisher = diagonal_fisher(model, data, labels=labels, chunk_size=chunk_size,
                             generator=torch.Generator().manual_seed(7))
    reference = data if labels == "empirical" else true_labels(model, data, 7)
    f_w, f_b = linear_softmax_fisher(model.weight.detach(), model.bias.detach(), reference)
    torch.testing.assert_close(fisher["weight"], f_w, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(fisher["bias"], f_b, rtol=1e-10, atol=1e-14)


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                                  nn.Conv2d(6, CLASSES, 1))

    def forward(self, x):
        return self.body(x)


def small_net():
    torch.manual_seed(1)
    net = SmallConvNet().double()
    bn = net.body[1]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 2.0)
    return net.train()  # diagonal_fisher must switch BN to eval itself


def autograd_loop(net, data, micro=1):
    """Independent reference: one autograd.grad per (micro-)batch, float64, BN in eval mode."""
    net = net.eval()
    params = [p for p in net.parameters()]
    sums, n = [torch.zeros_like(p) for p in params], 0
    for images, labels in data:
        for start in range(0, images.shape[0], micro):
            logits = net(images[start:start + micro])
            target = labels[start:start + micro]
            if (target != 255).any():
                loss = F.cross_entropy(logits, target, ignore_index=255)
            else:
                loss = logits.sum() * 0
            for s, g in zip(sums, torch.autograd.grad(loss, params)):
                s += g.square()
            n += 1
    return {name: s / n for (name, _), s in zip(net.named_parameters(), sums)}


@pytest.mark.parametrize("labels", ["empirical", "true"])
def test_per_sample_fisher_equals_a_float64_autograd_loop(labels):
    net, data = small_net(), batches(seed=3)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    fisher = diagonal_fisher(net, data, labels=labels, chunk_size=2, generator=torch.Generator().manual_seed(5))
    assert net.training and all(m.training for m in net.modules())  # mode restored
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())  # BN statistics untouched
    reference = data if labels == "empirical" else true_labels(net.eval(), data, 5)
    expected = autograd_loop(net, reference)
    assert fisher.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-9, atol=1e-15, msg=name)
        assert expected[name].abs().sum() > 0


def test_micro_batch_fisher_is_the_mean_squared_micro_batch_gradient():
    net, data = small_net(), batches(seed=4)
    names = ["body.0.weight", "body.3.bias"]
    fisher = diagonal_fisher(net, data, names, estimator="micro_batch", micro_batch_size=2)
    expected = autograd_loop(net, data, micro=2)
    assert list(fisher) == names
    for name in names:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-9, atol=1e-15)
    single = diagonal_fisher(net, data, names, estimator="micro_batch", micro_batch_size=1)
    per_sample = diagonal_fisher(net, data, names)
    for name in names:
        torch.testing.assert_close(single[name], per_sample[name], rtol=1e-9, atol=1e-15)
        assert not torch.allclose(fisher[name], per_sample[name])


def test_sampled_labels_follow_the_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0]).view(1, 4, 1, 1).expand(1, 4, 100, 100)
    draws = sample_labels(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws.flatten(), minlength=4).double() / draws.numel()
    torch.testing.assert_close(freq, logits[0, :, 0, 0].double().softmax(0), atol=0.01, rtol=0)


def test_unshifted_view_gives_zero_shift_zero_delta_and_dr_fim_equal_to_fisher():
    torch.manual_seed(0)
    net = SegmentationNet(**TINY_NET).eval()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.rand(2, 3, 32, 32, generator=gen), torch.randint(0, 19, (2, 32, 32), generator=gen))]
    names = [n for n, _ in net.named_parameters() if n.startswith("encoder.layer1")]
    identity = lambda images: images  # noqa: E731
    eps_mu, eps_sigma = feature_shift(encoder_feature_maps(net), data, data, module=net)
    assert eps_mu.item() == 0 and eps_sigma.item() == 0
    fisher = diagonal_fisher(net, data, names)
    shifted = diagonal_fisher(net, [(identity(x), y) for x, y in data], names)
    for name in names:
        assert torch.equal(delta_fisher(fisher[name], shifted[name]), torch.zeros_like(fisher[name]))
        assert torch.equal(dr_fim(fisher[name], shifted[name], eps_mu, eps_sigma), fisher[name])
    # The default LAB shift is a real shift of the features.
    shift = lab_style_shift(torch.Generator().manual_seed(0))
    mu, sigma = feature_shift(encoder_feature_maps(net), data, [(shift(x), y) for x, y in data], module=net)
    assert mu > 0 and sigma > 0


def test_feature_shift_of_an_affine_shift_by_hand():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    data = [(images[:2], None), (images[2:], None)]  # moments accumulate over batches
    eps_mu, eps_sigma = feature_shift(lambda x: [x], data, [(2 * x + 1, y) for x, y in data], delta=0.0)
    mean = images.mean(dim=(0, 2, 3))
    std = images.transpose(0, 1).reshape(2, -1).std(dim=1, unbiased=False)
    expected_mu = ((mean + 1) / std).square().mean().sqrt()  # μ' − μ = μ + 1
    torch.testing.assert_close(eps_mu, expected_mu)
    torch.testing.assert_close(eps_sigma, torch.tensor(math.log(2.0), dtype=torch.float64))


def test_delta_fisher_and_dr_fim_by_hand():
    f, f_shift = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 2.0, 0.25])
    # ΔF = |F − F'| / (min + 0.1) = [2/1.1, 0, 0.25/0.35]; weight exp(−(0.2 + 0.3)) = 0.60653066
    torch.testing.assert_close(delta_fisher(f, f_shift, 0.1), torch.tensor([1.8181818, 0.0, 0.7142857]))
    torch.testing.assert_close(dr_fim(f, f_shift, 0.2, 0.3, 0.1), torch.tensor([2.1027830, 2.0, 0.9332362]))
    # Variational, as written: γ(Λx − τ⁻² + w |Λx − Λx'| / (min + ε/γ)), γ = 0.5, τ = 1, ε = 0.1
    lam, lam_shift = torch.tensor([3.0, 5.0, 2.0]), torch.tensor([4.0, 5.0, 1.5])
    torch.testing.assert_close(variational_dr_fim(lam, lam_shift, 0.2, 0.3, gamma=0.5, tau=1.0, epsilon=0.1),
                               torch.tensor([1.0947704, 2.0, 0.5891957]))


def test_variational_precision_converges_to_fisher_over_gamma_plus_prior_on_a_quadratic():
    """L(w) = ½ (w − c)ᵀ H (w − c): E_q[L] = L(θ̂) + ½ Σ H_ii/Λ_i exactly, so the optimum of
    E_q[L] + γ KL is Λ = diag(H)/γ + τ⁻². The estimate is a running mean over Monte-Carlo steps
    (relative standard error about sqrt(2/T) = 5 % per entry at T = 800): tolerance 10 % relative."""
    gen = torch.Generator().manual_seed(0)
    diag = torch.tensor([0.02, 0.1, 0.5, 1.0, 3.0], dtype=torch.float64)
    coupling = 0.01 * torch.randn(5, 5, generator=gen, dtype=torch.float64)
    hessian = torch.diag(diag) + coupling @ coupling.T
    centre = torch.randn(5, generator=gen, dtype=torch.float64)
    mean = {"w": torch.randn(5, generator=gen, dtype=torch.float64)}

    def loss(params, batch):
        d = params["w"] - centre
        return 0.5 * d @ hessian @ d

    gamma, tau = 0.01, 2.0
    precision = variational_precision(loss, mean, [None], gamma=gamma, tau=tau, steps=800,
                                      generator=torch.Generator().manual_seed(1))
    expected = hessian.diagonal() / gamma + tau ** -2
    torch.testing.assert_close(precision["w"], expected, rtol=0.10, atol=0)
    # A constant step size is an exponential moving average: still around the optimum.
    ema = variational_precision(loss, mean, [None], gamma=gamma, tau=tau, steps=800, step_size=0.01,
                                generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ema["w"], expected, rtol=0.25, atol=0)


def test_variational_precision_runs_on_a_segmentation_net():
    net = SegmentationNet(**TINY_NET).eval()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.rand(2, 3, 32, 32, generator=gen), torch.randint(0, 19, (2, 32, 32), generator=gen))]
    mean = {n: p.detach() for n, p in net.named_parameters() if n.startswith("encoder.layer1.0")}
    precision = variational_precision(segmentation_loss(net), mean, data, steps=3, tau=0.1,
                                      generator=torch.Generator().manual_seed(0))
    assert precision.keys() == mean.keys()
    for name, value in precision.items():
        assert value.shape == mean[name].shape and torch.isfinite(value).all() and (value > 0).all()
        assert (value >= 100.0).all() and (value > 100.0).any()  # at or above the prior τ⁻² = 100


def test_selection_keeps_exactly_the_ceiling_of_the_fraction():
    gen = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(10, 7, generator=gen), "b": torch.rand(13, generator=gen), "c": torch.rand(3, 2, generator=gen)}
    total = sum(s.numel() for s in scores.values())  # 89
    for fraction in (0.0, 0.05, 0.1, 0.5, 1.0):
        masks = select_entries(scores, fraction)
        assert sum(int(m.sum()) for m in masks.values()) == math.ceil(round(fraction * total, 9))
        kept = torch.cat([s[m] for s, m in zip(scores.values(), masks.values())])
        dropped = torch.cat([s[~m] for s, m in zip(scores.values(), masks.values())])
        if kept.numel() and dropped.numel():
            assert kept.min() >= dropped.max()  # the top entries
        per_layer = select_entries(scores, fraction, "per_layer")
        for name, mask in per_layer.items():
            assert mask.shape == scores[name].shape and mask.dtype == torch.bool
            assert int(mask.sum()) == math.ceil(round(fraction * mask.numel(), 9))
    assert sum(int(m.sum()) for m in select_entries({"x": torch.rand(100)}, 0.05).values()) == 5  # not 6


def test_per_layer_and_global_selection_differ_where_one_tensor_dominates():
    scores = {"small": torch.linspace(0, 1, 20), "large": 10 + torch.linspace(0, 1, 20)}
    global_masks = select_entries(scores, 0.25)
    per_layer = select_entries(scores, 0.25, "per_layer")
    assert global_masks["small"].sum() == 0 and global_masks["large"].sum() == 10
    assert per_layer["small"].sum() == 5 and per_layer["large"].sum() == 5
    assert per_layer["small"][-5:].all()


def test_ties_are_broken_by_position_and_nan_ranks_last():
    scores = {"a": torch.tensor([1.0, float("nan"), 1.0]), "b": torch.tensor([1.0, 2.0])}
    masks = select_entries(scores, 0.6)  # keeps 3 of 5: b[1], then the first tied ones a[0], a[2]
    assert masks["a"].tolist() == [True, False, True] and masks["b"].tolist() == [False, True]
    assert select_entries(scores, 0.6).keys() == masks.keys()
    ranks = entry_ranks(scores)
    assert ranks["a"].tolist() == [1, 4, 2] and ranks["b"].tolist() == [3, 0]
