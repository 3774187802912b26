import pytest
import torch
import torch.nn.functional as F

from model_zoo.architectures import build_model
from model_zoo.backbones.base import CheckpointMismatch, load_checkpoint
from model_zoo.backbones.ibn import InstanceBatchNorm2d
from model_zoo.backbones.mobilenetv2 import MobileNetV2, convert_flat_layout
from model_zoo.backbones.resnet import ResNet50
from model_zoo.registry import BACKBONE_REGISTRY

NESTED_TO_FLAT_T1 = {"0.0": "0", "0.1": "1", "1": "3", "2": "4"}
NESTED_TO_FLAT = {"0.0": "0", "0.1": "1", "1.0": "3", "1.1": "4", "2": "6", "3": "7"}


@pytest.mark.parametrize("name", ["mobilenetv2", "resnet50", "osnet_x0_25", "osnet_x1_0"])
def test_a_256x128_input_gives_a_16x8_map(name):
    parts = BACKBONE_REGISTRY.get(name)(None)
    with torch.no_grad():
        maps = parts.last_stage(parts.trunk(torch.zeros(1, 3, 256, 128)))
    assert maps.shape == (1, parts.out_channels, 16, 8)


def test_resnet50_keys_are_torchvision_keys():
    keys = set(ResNet50().state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer4.2.conv3.weight"} <= keys
    assert ResNet50().layer4[0].conv2.stride == (1, 1)


def test_osnet_keys_are_torchreids_keys_for_every_width_and_ibn():
    """Key names and shapes as torchreid's osnet.py writes them (read from a torchreid MSMT17 checkpoint)."""
    from model_zoo.backbones.osnet import build_osnet

    x0_25 = build_osnet("osnet_x0_25").state_dict()
    expected = {
        "conv1.conv.weight": (16, 3, 7, 7),
        "conv2.0.conv2d.3.conv2.weight": (16, 1, 3, 3),
        "conv2.0.gate.fc1.weight": (1, 16, 1, 1),
        "conv2.0.downsample.bn.running_var": (64,),
        "conv2.2.0.conv.weight": (64, 64, 1, 1),
        "conv4.1.gate.fc2.bias": (32,),
        "conv5.bn.weight": (128,),
        "fc.0.weight": (512, 128),
        "fc.1.running_mean": (512,),
    }
    assert {key: tuple(x0_25[key].shape) for key in expected} == expected
    assert len(x0_25) == 567 - 2  # torchreid's file has 567 entries, the classifier's two among them
    ibn = build_osnet("osnet_x1_0", ibn=True).state_dict()
    assert "conv1.bn.running_mean" not in ibn and "conv2.0.IN.weight" in ibn and "conv3.0.IN.weight" not in ibn
    with pytest.raises(ValueError, match="IBN-b"):
        build_osnet("osnet_x1_0", ibn="b")


def test_osnet_ain_keys_are_torchreids():
    """torchreid's osnet_ain.py: streams as conv2.T.layers.i, transitions as pool2 / pool3, the instance-norm
    blocks' conv3 without a batch norm and an IN after it, the pattern IN-IN, BN-IN, IN-BN."""
    from model_zoo.backbones.osnet import build_osnet

    keys = set(build_osnet("osnet_ain_x1_0").state_dict())
    assert {
        "conv2.0.conv2.3.layers.3.conv2.weight",
        "pool2.0.conv.weight",
        "pool3.0.bn.running_var",
        "conv1.bn.weight",
        "fc.1.running_mean",
    } <= keys
    assert "conv1.bn.running_mean" not in keys  # the stem's norm is an instance norm
    with_in = {
        block
        for block in ("conv2.0", "conv2.1", "conv3.0", "conv3.1", "conv4.0", "conv4.1")
        if f"{block}.IN.weight" in keys
    }
    assert with_in == {"conv2.0", "conv2.1", "conv3.1", "conv4.0"}
    assert all(
        (f"{block}.conv3.bn.weight" in keys) != (block in with_in) for block in ("conv2.0", "conv3.0", "conv4.1")
    )
    with pytest.raises(ValueError, match="no IBN"):
        build_osnet("osnet_ain_x1_0", ibn=True)


def test_checkpoint_loading_reports_missing_and_unexpected_keys(tmp_path):
    state = ResNet50().state_dict()
    state.pop("layer4.2.bn3.bias")
    state["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(state, tmp_path / "r50.pth")
    report = load_checkpoint(ResNet50(), tmp_path / "r50.pth")
    assert report == {"missing": ["layer4.2.bn3.bias"], "unexpected": ["fc.weight"]}


def test_checkpoint_loading_refuses_a_shape_mismatch(tmp_path):
    state = MobileNetV2().state_dict()
    state["features.18.0.weight"] = torch.zeros(1000, 320, 1, 1)
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatch, match="features.18.0.weight"):
        load_checkpoint(MobileNetV2(), tmp_path / "bad.pth", convert=convert_flat_layout)


def test_the_original_flat_mobilenetv2_layout_loads_into_torchvision_keys(tmp_path):
    reference = MobileNetV2()
    for p in reference.parameters():
        torch.nn.init.normal_(p)
    flat = {}
    for key, value in reference.state_dict().items():
        parts = key.split(".")
        if parts[2] == "conv":
            block, rest = parts[1], parts[3:]
            table = NESTED_TO_FLAT_T1 if block == "1" else NESTED_TO_FLAT
            nested = ".".join(rest[:2]) if ".".join(rest[:2]) in table else rest[0]
            tail = rest[len(nested.split(".")) :]
            key = ".".join(["features", block, "conv", table[nested], *tail])
        flat[key] = value
    torch.save(flat, tmp_path / "flat.pt")
    model = MobileNetV2()
    assert load_checkpoint(model, tmp_path / "flat.pt", convert=convert_flat_layout) == {
        "missing": [],
        "unexpected": [],
    }
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_cama_branches_own_their_last_stage_and_output_the_contract_shapes():
    model = build_model(
        {"architecture": "cama", "backbone": "mobilenetv2", "num_branches": 3, "reduction_dim": 32}, num_classes=5
    )
    first, second = model.branches[0].stage, model.branches[1].stage
    assert first is not second and first[0].conv[0][0].weight is not second[0].conv[0][0].weight
    images = torch.randint(0, 256, (2, 64, 32, 3), dtype=torch.uint8)
    out = model.train()(images)
    assert out.feature_maps.shape == (2, 3, 32, 4, 2) and out.logits.shape == (2, 3, 5)
    maps = model.target_activation_maps(out.feature_maps, torch.tensor([1, 4]))
    manual = torch.einsum("dhw,d->hw", out.feature_maps[1, 2], model.branches[2].classifier.weight[4])
    torch.testing.assert_close(maps[1, 2], manual)
    # class scores = GAP(M) (eq. 4)
    torch.testing.assert_close(maps[:, 2].mean(dim=(1, 2))[1], out.logits[1, 2, 4])
    model.eval()
    embedding = model(images).embedding
    assert embedding.shape == (2, 96)
    torch.testing.assert_close(embedding.view(2, 3, 32).norm(dim=2), torch.ones(2, 3))


@pytest.mark.parametrize("name", ["mobilenetv2", "resnet50"])
def test_ibn_keeps_every_key_so_imagenet_checkpoints_load_unchanged(name):
    plain, ibn = BACKBONE_REGISTRY.get(name)(None), BACKBONE_REGISTRY.get(name)(None, ibn=True)
    shapes = [{k: v.shape for k, v in parts.trunk.state_dict().items()} for parts in (plain, ibn)]
    assert shapes[0] == shapes[1]
    assert any(isinstance(m, InstanceBatchNorm2d) for m in ibn.trunk.modules())
    assert not any(isinstance(m, InstanceBatchNorm2d) for m in ibn.last_stage.modules())


def test_mobilenetv2_ibn_loads_a_torchvision_checkpoint(tmp_path):
    reference = MobileNetV2()
    for p in reference.parameters():
        torch.nn.init.normal_(p)
    torch.save(reference.state_dict(), tmp_path / "mnv2.pt")
    model = MobileNetV2()
    model.use_ibn()
    assert load_checkpoint(model, tmp_path / "mnv2.pt") == {"missing": [], "unexpected": []}
    assert torch.equal(model.features[3].conv[0][1].weight, reference.features[3].conv[0][1].weight)
    assert isinstance(model.features[3].conv[0][1], InstanceBatchNorm2d)


def test_mobilenetv2_ibn_b_keeps_every_key_and_its_stem_ignores_an_images_contrast(tmp_path):
    reference = MobileNetV2()
    torch.save(reference.state_dict(), tmp_path / "mnv2.pt")
    model = MobileNetV2()
    model.use_ibn("b")
    assert load_checkpoint(model, tmp_path / "mnv2.pt") == {"missing": [], "unexpected": []}
    stem = model.features[0][1]
    assert isinstance(stem, InstanceBatchNorm2d) and stem.instance_channels == stem.num_features == 32
    assert [i for i, block in enumerate(model.features[1:-1], 1) if block.IN is not None] == [
        3,
        6,
    ]  # stride-4 and -8 stages' ends
    model.eval()
    image = torch.rand(1, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.features[0](3 * image), model.features[0](image), atol=2e-3, rtol=1e-3
        )  # eps aside
        stage_end = model.features[:7](image)
    torch.testing.assert_close(stage_end.mean(dim=(2, 3)), torch.zeros(1, 32), atol=1e-5, rtol=0)  # instance-normalised
    plain = MobileNetV2().eval()
    with torch.no_grad():
        assert not torch.allclose(plain.features[0](3 * image), plain.features[0](image), atol=1e-2)


def test_resnet50_ibn_b_adds_ibn_nets_own_keys_and_nothing_else():
    plain, ibn = ResNet50(), ResNet50()
    ibn.use_ibn("b")
    added = set(ibn.state_dict()) - set(plain.state_dict())
    assert added == {"layer1.2.IN.weight", "layer1.2.IN.bias", "layer2.3.IN.weight", "layer2.3.IN.bias"}
    assert set(plain.state_dict()) <= set(ibn.state_dict()) and isinstance(ibn.bn1, InstanceBatchNorm2d)
    parts = ibn.split()
    with torch.no_grad():
        assert parts.last_stage(parts.trunk(torch.rand(2, 3, 64, 32))).shape == (2, 2048, 4, 2)


@pytest.mark.parametrize("value, variant", [(False, None), (None, None), (True, "a"), ("a", "a"), ("b", "b")])
def test_the_ibn_setting_names_a_variant_and_refuses_others(value, variant):
    from model_zoo.backbones.ibn import ibn_variant

    assert ibn_variant(value) == variant
    with pytest.raises(ValueError, match="IBN-b"):
        ibn_variant("ab")


def test_instance_batch_norm_equals_instance_norm_beside_batch_norm():
    torch.manual_seed(0)
    layer = InstanceBatchNorm2d(8)
    layer.weight.data.uniform_(0.5, 2)
    layer.bias.data.normal_()
    x = (torch.randn(6, 8, 5, 4) * 3 + 1).requires_grad_()
    running_mean, running_var = layer.running_mean.clone(), layer.running_var.clone()

    def reference(x, mean, var, training):
        instance = F.instance_norm(x[:, :4], eps=layer.eps)
        batch = F.batch_norm(x[:, 4:], mean[4:], var[4:], None, None, training, layer.momentum, layer.eps)
        return torch.cat([instance, batch], 1) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)

    out, expected = layer(x), reference(x, running_mean, running_var, True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.running_mean, running_mean)
    torch.testing.assert_close(layer.running_var, running_var)
    grad = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0], atol=1e-5, rtol=1e-5
    )
    layer.eval()
    torch.testing.assert_close(
        layer(x), reference(x, layer.running_mean, layer.running_var, False), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("name", ["mobilenetv2", "resnet50", "osnet_x0_25", "osnet_ain_x0_25"])
def test_named_stages_compose_to_the_trunk_and_last_stage_and_state_their_shapes(name):
    from model_zoo.backbones.base import STAGE_NAMES, run_stages

    parts = BACKBONE_REGISTRY.get(name)(None)
    assert tuple(parts.stages) == STAGE_NAMES
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        taps = run_stages(parts.stages, x, STAGE_NAMES)
        torch.testing.assert_close(taps["layer4"], parts.last_stage(parts.trunk(x)))
        torch.testing.assert_close(parts.stage_range("layer2", "layer3")(taps["layer1"]), taps["layer3"])
    for stage, out in taps.items():
        assert out.shape[1:] == (
            parts.stage_channels[stage],
            64 // parts.stage_strides[stage],
            32 // parts.stage_strides[stage],
        ), stage
    assert parts.stage_range("stem", "layer1")[1] is parts.stages["layer1"]  # views, not copies
    with pytest.raises(KeyError, match="no stage named"):
        run_stages(parts.stages, x, ["pool5"])


@pytest.mark.parametrize("name", ["mobilenetv2", "resnet50"])
def test_last_stride_two_halves_the_last_map(name):
    parts = BACKBONE_REGISTRY.get(name)(None, last_stride=2)
    with torch.no_grad():
        out = parts.last_stage(parts.trunk(torch.zeros(1, 3, 64, 32)))
    assert parts.stride == parts.stage_strides["layer4"] == 32 and out.shape[2:] == (2, 1)


@pytest.mark.parametrize("backbone", ["mobilenetv2", "resnet50"])
@pytest.mark.parametrize("ibn", ["a", "b"])
def test_ibn_networks_export_with_parity(backbone, ibn, market_root, tmp_path):
    """Instance statistics per image in ONNX Runtime as in PyTorch: the contract's identity holds."""
    from tests.conftest import TINY_HEIGHT, TINY_WIDTH, tiny_overrides
    from training import load_config
    from training.checkpoints import model_settings
    from model_zoo.onnx_export import check_parity, parity_images, write_onnx
    from training.export import describe

    cfg = load_config(
        "base.yaml", tiny_overrides(market_root, tmp_path, **{"model.backbone": backbone, "model.ibn": ibn})
    )
    model = build_model(model_settings(cfg), num_classes=5).eval()
    write_onnx(model, describe(model, cfg, None), tmp_path / "model.onnx")
    report = check_parity(model, tmp_path / "model.onnx", parity_images(TINY_HEIGHT, TINY_WIDTH, None))
    assert max(v for k, v in report.items() if k.endswith("_identity")) <= 1e-4
    assert max(v for k, v in report.items() if k.endswith("_embedding")) <= 1e-4, report


def test_export_zeroes_subnormal_weights_and_keeps_parity(market_root, tmp_path):
    """Subnormal weights (a long schedule's weight decay leaves thousands) are zeroed in the file: x86 CPUs
    multiply them in microcode, and they change no output."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from tests.conftest import TINY_HEIGHT, TINY_WIDTH, tiny_overrides
    from training import load_config
    from training.checkpoints import model_settings
    from model_zoo.onnx_export import check_parity, parity_images, write_onnx
    from training.export import describe

    cfg = load_config("base.yaml", tiny_overrides(market_root, tmp_path))
    model = build_model(model_settings(cfg), num_classes=5).eval()
    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        convolutions[-1].weight[:3] = 1e-40
    assert (
        write_onnx(model, describe(model, cfg, None), tmp_path / "model.onnx") >= 3 * convolutions[-1].weight[0].numel()
    )
    smallest_normal = np.finfo(np.float32).tiny
    for tensor in onnx.load(str(tmp_path / "model.onnx")).graph.initializer:
        weights = numpy_helper.to_array(tensor)
        if weights.dtype == np.float32:
            assert not ((weights != 0) & (np.abs(weights) < smallest_normal)).any(), tensor.name
    report = check_parity(model, tmp_path / "model.onnx", parity_images(TINY_HEIGHT, TINY_WIDTH, None))
    assert max(v for k, v in report.items() if k.endswith("_embedding")) <= 1e-4, report
