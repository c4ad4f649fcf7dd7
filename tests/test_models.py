import pytest
import torch

from fedkd.models import MODELS, build_model, init_uniform
from fedkd.registry import UnknownNameError


@pytest.mark.parametrize("name", ["mlp", "cnn", "lenet", "convnet", "hyperfl-cnn", "pfedhn-cnn"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_models_map_images_to_logits(name, shape):
    m = build_model(name, shape, 10, dropout=0.25)
    assert m(torch.rand(3, *shape)).shape == (3, 10)


def test_dropout_is_present_only_when_asked():
    assert not any(isinstance(l, torch.nn.Dropout) for l in build_model("mlp", (1, 8, 8), 10).modules())
    assert any(isinstance(l, torch.nn.Dropout) for l in build_model("mlp", (1, 8, 8), 10, dropout=0.5).modules())


def test_lenet_is_dlgs_sigmoid_lenet():
    m = build_model("lenet", (1, 28, 28), 10)
    assert sum(isinstance(l, torch.nn.Sigmoid) for l in m.modules()) == 3
    init_uniform(m, seed=0)
    flat = torch.cat([p.detach().flatten() for p in m.parameters()])
    assert flat.abs().max() <= 0.5 and flat.abs().max() > 0.49 and abs(flat.mean()) < 0.05


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        MODELS.get("resnet")
    assert "cnn" in str(e.value) and "lenet" in str(e.value) and "mlp" in str(e.value)


def test_convnet_is_the_papers_convnet():
    from fedkd.models import ConvNet

    m = build_model("convnet", (3, 28, 28), 10)
    assert isinstance(m, ConvNet) and m.embedding_dim == 128 * 3 * 3
    x = torch.rand(4, 3, 28, 28)
    emb, logits = m.embed_and_logits(x)
    assert emb.shape == (4, 1152) and logits.shape == (4, 10)
    assert torch.equal(m(x), logits) and torch.equal(m.embed(x), emb)
    norms = [l for l in m.modules() if isinstance(l, torch.nn.GroupNorm)]
    assert len(norms) == 3 and all(n.num_groups == n.num_channels == 128 for n in norms)  # instance norm
    assert sum(isinstance(l, torch.nn.AvgPool2d) for l in m.modules()) == 3
    assert sum(isinstance(l, torch.nn.Conv2d) for l in m.modules()) == 3
    # instance norm: an image's embedding does not depend on the rest of the batch
    assert torch.allclose(m.embed(x[:1]), emb[:1], atol=1e-5)
    # 1-channel 28x28 input: padding 3 in the first conv, as the authors' code (-> 128 * 4 * 4)
    assert build_model("convnet", (1, 28, 28), 10).embedding_dim == 128 * 4 * 4
    assert build_model("convnet", (1, 8, 8), 10)(torch.rand(2, 1, 8, 8)).shape == (2, 10)
