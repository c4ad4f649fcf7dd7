import pytest
import torch

from fedkd.models import MODELS, build_model, init_uniform
from fedkd.registry import UnknownNameError


@pytest.mark.parametrize("name", ["mlp", "cnn", "lenet", "hyperfl-cnn", "pfedhn-cnn"])
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
