"""fedkd.distill: DiffAugment (siamese), distribution matching, gradient matching, SupCon, class statistics, grids."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedkd.distill import (
    average_stats,
    class_channel_stats,
    distribution_matching,
    embedding_mean_distance,
    gradient_match_distance,
    gradient_matching,
    init_from_stats,
    match_distance,
    pseudo_gradient,
    save_virtual_grid,
    supcon_loss,
)
from fedkd.distill.diffaugment import GROUPS, AugDraw, apply, draw, parse_strategy, siamese_augment
from fedkd.distill.gradient_matching import layer_distance, synthetic_gradient
from fedkd.distill.supcon import alignment_loss
from fedkd.models import ConvNet


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small tensors: one intra-op thread is as fast, and does not spin against other processes on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- DiffAugment
def test_siamese_augmentation_applies_one_draw_to_both_batches_and_is_reproducible():
    real = torch.rand(6, 3, 28, 28)
    syn = real[:2].clone().requires_grad_(True)  # the same images, in a smaller batch
    rng_state = torch.get_rng_state()
    seen = set()
    for seed in range(40):
        a_real, a_syn = siamese_augment(real, syn, generator=gen(seed))
        assert torch.allclose(a_real[:2], a_syn, atol=1e-6)  # the same transformation on both batches
        b_real, _ = siamese_augment(real, syn, generator=gen(seed))
        assert torch.equal(a_real, b_real)  # reproducible with a seeded generator
        seen.add(draw("color_crop_cutout_flip_scale_rotate", gen(seed)).group)
        a_syn.sum().backward()  # differentiable in the synthetic images
    assert seen == set(GROUPS)  # every group of the strategy gets picked
    assert syn.grad is not None and torch.isfinite(syn.grad).all()
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is untouched
    # one draw for every image of a batch (siamese), not one per image
    same = torch.rand(1, 3, 28, 28).repeat(4, 1, 1, 1)
    for seed in range(12):
        out = siamese_augment(same, generator=gen(seed))[0]
        assert torch.allclose(out, out[:1].expand_as(out), atol=1e-6)
    differs = sum(not torch.equal(siamese_augment(real, generator=gen(s))[0], siamese_augment(real, generator=gen(s + 100))[0]) for s in range(10))
    assert differs >= 8


def test_each_dsa_transform_does_what_the_paper_says():
    x = torch.rand(2, 3, 28, 28)
    assert torch.equal(apply(x, AugDraw("flip", (0.2,))), x.flip(3)) and torch.equal(apply(x, AugDraw("flip", (0.7,))), x)
    # crop: an integer translation in [-4, 4] with zero fill; values (0, 1) -> (-4, +4)
    out = apply(x, AugDraw("crop", (0.0, 0.999)))
    ref = torch.zeros_like(x)
    ref[:, :, 4:, : 28 - 4] = x[:, :, : 28 - 4, 4:]
    assert torch.equal(out, ref)
    # cutout: a 14 x 14 zero window centred at the drawn position, clipped at the border
    out = apply(torch.ones(1, 1, 28, 28), AugDraw("cutout", (0.0, 0.5)))
    assert out.sum().item() == 28 * 28 - 7 * 14 and out[0, 0, :7, 7:21].sum() == 0
    # color with b = s = c = 0.5: brightness 0, saturation x1, contrast x1 -> identity
    assert torch.allclose(apply(x, AugDraw("color", (0.5, 0.5, 0.5))), x, atol=1e-6)
    assert torch.allclose(apply(x, AugDraw("color", (1.0, 0.5, 0.5))), x + 0.5, atol=1e-6)
    # scale 1 and rotation 0 are (bilinear) identities; rotation by 15 degrees changes the image
    one = (1 - 1 / 1.2) / (1.2 - 1 / 1.2)  # the uniform value that draws a scale factor of exactly 1
    assert torch.allclose(apply(x, AugDraw("scale", (one, one))), x, atol=1e-4)
    assert not torch.allclose(apply(x, AugDraw("scale", (1.0, one))), x, atol=1e-2)
    assert torch.allclose(apply(x, AugDraw("rotate", (0.5,))), x, atol=1e-5)
    assert not torch.allclose(apply(x, AugDraw("rotate", (1.0,))), x, atol=1e-2)
    assert parse_strategy("none") == () and siamese_augment(x, generator=gen(0), strategy="none")[0] is x
    with pytest.raises(ValueError, match="valid: color"):
        parse_strategy("color_blur")


# --------------------------------------------------------------------------- distribution matching
def small_net() -> ConvNet:
    return ConvNet((3, 12, 12), 3, width=16, depth=2)


def class_data(n_per_class=40, seed=0):
    """Three classes whose images differ in mean colour and in a bright stripe's position."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(3):
        x = 0.3 * torch.randn(n_per_class, 3, 12, 12, generator=g)
        x[:, c] += 1.0
        x[:, :, 4 * c : 4 * c + 4] += 1.5
        xs.append(x)
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(xs), torch.cat(ys)


def test_distribution_matching_reduces_the_embedding_mean_distance():
    real_x, real_y = class_data()
    labels = torch.arange(3).repeat_interleave(5)
    images = torch.randn(15, 3, 12, 12, generator=gen(1))
    torch.manual_seed(123)
    judge = small_net()  # a random network the matching never sees
    start = embedding_mean_distance(judge, images, labels, real_x, real_y)
    rng_state = torch.get_rng_state()
    # warm-up: a fresh random ConvNet every iteration, DSA on, SGD lr 1 momentum 0.5
    losses = distribution_matching(images, labels, real_x, real_y, iterations=60, generator=gen(2), net_factory=small_net, batch_real=16)
    assert torch.equal(torch.get_rng_state(), rng_state) and len(losses) == 60
    after_warmup = embedding_mean_distance(judge, images, labels, real_x, real_y)
    assert after_warmup < 0.5 * start, (start, after_warmup)
    # iterative refresh with a given embedder (the global model): its own distance falls, the embedder is untouched
    torch.manual_seed(7)
    global_model = small_net()
    before_state = {k: v.clone() for k, v in global_model.state_dict().items()}
    before = embedding_mean_distance(global_model, images, labels, real_x, real_y)
    distribution_matching(images, labels, real_x, real_y, iterations=30, generator=gen(3), embedder=global_model, batch_real=40, strategy="none")
    assert embedding_mean_distance(global_model, images, labels, real_x, real_y) < 0.5 * before
    assert all(torch.equal(v, global_model.state_dict()[k]) for k, v in before_state.items())
    assert all(p.requires_grad for p in global_model.parameters())
    with pytest.raises(ValueError, match="exactly one"):
        distribution_matching(images, labels, real_x, real_y, iterations=1, generator=gen(0))


def test_distribution_matching_is_reproducible_with_a_seeded_generator():
    real_x, real_y = class_data()
    labels = torch.arange(3).repeat_interleave(2)
    a, b = torch.randn(6, 3, 12, 12, generator=gen(5)), torch.randn(6, 3, 12, 12, generator=gen(5))
    la = distribution_matching(a, labels, real_x, real_y, iterations=3, generator=gen(9), net_factory=small_net, batch_real=8)
    lb = distribution_matching(b, labels, real_x, real_y, iterations=3, generator=gen(9), net_factory=small_net, batch_real=8)
    assert la == lb and torch.equal(a, b)


# --------------------------------------------------------------------------- gradient matching
def test_layer_distance_is_dataset_condensations_distance():
    g = gen(0)
    a, b = torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    naive = sum(1 - float(a[i].flatten() @ b[i].flatten()) / (float(a[i].norm() * b[i].norm()) + 1e-6) for i in range(4))
    assert math.isclose(float(layer_distance(a, b)), naive, rel_tol=1e-5)
    assert float(layer_distance(torch.randn(5), torch.randn(5))) == 0.0  # biases and norms are ignored
    w = torch.randn(6, 7, generator=g)
    assert abs(float(layer_distance(w, 3 * w))) < 1e-5 and math.isclose(float(layer_distance(w, -w)), 12.0, rel_tol=1e-5)


def test_pseudo_gradient_of_one_sgd_step_is_the_gradient():
    torch.manual_seed(0)
    model = small_net()
    x, y = class_data(4)
    old = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
    grads = synthetic_gradient(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    new = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
    pg = pseudo_gradient(model, old, new, lr=0.01)
    assert all(torch.allclose(p, g, atol=1e-4) for p, g in zip(pg, grads))
    assert float(match_distance(pg, grads)) < 1e-3


def test_gradient_matching_reduces_its_distance():
    torch.manual_seed(0)
    model = small_net()
    real_x, real_y = class_data(20)
    target = synthetic_gradient(model, real_x, real_y)
    images = torch.randn(6, 3, 12, 12, generator=gen(4))
    labels = torch.arange(3).repeat_interleave(2)
    before = gradient_match_distance(model, images, labels, target)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    losses = gradient_matching(images, labels, model, target, iterations=40, lr=1.0, momentum=0.5)
    after = gradient_match_distance(model, images, labels, target)
    assert math.isclose(losses[0], before, rel_tol=1e-4)
    assert after < 0.6 * before, (before, after)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- SupCon
def naive_supcon(f, y, t=0.07, bt=0.07):
    z = [v / v.norm() for v in f]
    n, total = len(z), 0.0
    for i in range(n):
        denom = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(n) if a != i)
        pos = [p for p in range(n) if p != i and y[p] == y[i]]
        if pos:
            total += -(t / bt) * sum(math.log(math.exp(float(z[i] @ z[p]) / t) / denom) for p in pos) / len(pos)
    return total / n


def test_supcon_matches_a_naive_loop():
    g = gen(0)
    batch, global_ = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    yb, yg = torch.tensor([0, 1, 1, 2, 3, 0, 4]), torch.tensor([0, 0, 1, 1, 2, 2])  # labels 3 and 4: anchors with no positive
    loss = alignment_loss(batch, yb, global_, yg)
    assert math.isclose(float(loss), naive_supcon(torch.cat([batch, global_]), torch.cat([yb, yg]).tolist()), rel_tol=1e-9)
    assert math.isclose(float(supcon_loss(batch, yb, 0.5, 0.07)), naive_supcon(batch, yb.tolist(), 0.5, 0.07), rel_tol=1e-9)
    gf = global_.clone().requires_grad_(True)
    alignment_loss(batch, yb, gf, yg).backward()
    assert gf.grad.abs().sum() > 0  # the global features are pulled too


# --------------------------------------------------------------------------- class statistics
def test_class_channel_statistics_average_and_initialisation():
    g = np.random.default_rng(0)
    x = g.normal(size=(30, 3, 4, 4)).astype(np.float32)
    y = np.array([0] * 10 + [2] * 20)
    s = class_channel_stats(x, y, 4)
    assert s.present.tolist() == [True, False, True, False]
    assert np.allclose(s.mean[2], x[y == 2].transpose(1, 0, 2, 3).reshape(3, -1).mean(1), atol=1e-6)
    assert np.allclose(s.std[0], x[y == 0].transpose(1, 0, 2, 3).reshape(3, -1).std(1), atol=1e-6)
    assert np.all(s.mean[1] == 0) and np.all(s.std[3] == 0)
    other = class_channel_stats(x + 1.0, np.array([1] * 10 + [2] * 20), 4)
    avg = average_stats([s, other])
    assert avg.present.tolist() == [True, True, True, False]
    assert np.allclose(avg.mean[0], s.mean[0]) and np.allclose(avg.mean[1], other.mean[1])  # held by one client only
    assert np.allclose(avg.mean[2], (s.mean[2] + other.mean[2]) / 2) and np.allclose(avg.std[2], (s.std[2] + other.std[2]) / 2)
    images, labels = init_from_stats(avg, 400, (8, 8), gen(0))
    assert images.shape == (1600, 3, 8, 8) and labels.tolist() == sum([[c] * 400 for c in range(4)], [])
    for c in range(3):
        xc = images[labels == c].transpose(0, 1).reshape(3, -1)
        assert torch.allclose(xc.mean(1), torch.tensor(avg.mean[c]), atol=0.05)
        assert torch.allclose(xc.std(1), torch.tensor(avg.std[c]), atol=0.05)
    xc = images[labels == 3]
    assert abs(float(xc.mean())) < 0.05 and abs(float(xc.std()) - 1) < 0.05  # nobody holds class 3: N(0, 1)
    local, local_y = init_from_stats(s, 5, (8, 8), gen(1), classes=np.flatnonzero(s.present))
    assert local.shape == (10, 3, 8, 8) and local_y.tolist() == [0] * 5 + [2] * 5


def test_virtual_grid_png(tmp_path):
    import matplotlib.image

    images = torch.randn(3 * 4, 3, 28, 28)
    labels = torch.arange(3).repeat_interleave(4)
    path = save_virtual_grid(images, labels, tmp_path / "virtual" / "global-round0001.png")
    img = matplotlib.image.imread(path)
    assert img.shape[:2] == (2 * (3 * 30 + 2), 2 * (4 * 30 + 2))  # a row per class, 2-pixel gutters, pixels doubled
