"""ResNet-50 under the paper family's architectures, as a user runs it with their own torchvision weights:
no ImageNet ResNet-50 can be had offline here, so a saved random network stands in for the file."""

import pytest
import torch

from model_zoo.backbones.resnet import ResNet50
from tests.conftest import tiny_overrides
from training import load_config
from training.engine import Trainer


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    state = ResNet50().state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)  # torchvision's head, ignored
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "architecture, extra", [("fmn", {"model.last_stride": 2}), ("pmm", {"data.sampler": "pk", "data.num_instances": 2})]
)
def test_a_user_supplied_resnet50_loads_and_trains_a_few_steps(
    architecture, extra, torchvision_file, market_root, tmp_path, caplog
):
    overrides = {
        "model.architecture": architecture,
        "model.backbone": "resnet50",
        "model.pretrained": str(torchvision_file),
        "model.reduction_dim": 16,
        "solver.warmup_epochs": 0,
        "solver.max_iters_per_epoch": 1,
        **extra,
    }
    trainer = Trainer(load_config("base.yaml", tiny_overrides(market_root, tmp_path, **overrides)))
    assert "missing keys" not in caplog.text
    record = trainer.train_epoch(0)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in record.items() if k.startswith("loss"))
    trainer.model.eval()
    with torch.no_grad():
        maps = trainer.model(torch.zeros(2, 64, 32, 3, dtype=torch.uint8)).feature_maps
    branches, dim = (2, 2048) if architecture == "fmn" else (3, 16)
    stride = trainer.model.stride
    assert maps.shape == (2, branches, dim, 64 // stride, 32 // stride)
