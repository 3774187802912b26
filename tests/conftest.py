"""Shared fixtures: tiny synthetic Market-1501-layout data and a tiny training config."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_HEIGHT, TINY_WIDTH = 64, 32


def person_image(pid: int, variant: int, size=(20, 40)) -> Image.Image:
    """A synthetic 'person': two colour blocks fixed by the pid, plus a little noise per variant."""
    rng = np.random.default_rng(pid * 1000 + variant)
    palette = np.random.default_rng(pid).integers(0, 256, (2, 3))
    width, height = size
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[: height // 2] = palette[0]
    pixels[height // 2 :] = palette[1]
    noise = rng.integers(-20, 21, pixels.shape)
    return Image.fromarray(np.clip(pixels.astype(int) + noise, 0, 255).astype(np.uint8))


def write_market(root: Path, train_pids=range(6), test_pids=range(1000, 1004), per_camera: int = 3) -> Path:
    """A Market-1501-layout folder: train ids in cameras 1 and 2, test ids queried from c1 against c2."""
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    counter = 0
    for pid in train_pids:
        for cam in (1, 2):
            for _ in range(per_camera):
                counter += 1
                person_image(pid, counter).save(
                    root / "bounding_box_train" / f"{pid:04d}_c{cam}s1_{counter:06d}_00.jpg"
                )
    for pid in test_pids:
        counter += 1
        person_image(pid, counter).save(root / "query" / f"{pid:04d}_c1s1_{counter:06d}_00.jpg")
        for _ in range(2):
            counter += 1
            person_image(pid, counter).save(root / "bounding_box_test" / f"{pid:04d}_c2s1_{counter:06d}_00.jpg")
    return root


@pytest.fixture(scope="session")
def market_root(tmp_path_factory) -> Path:
    return write_market(tmp_path_factory.mktemp("data") / "market")


def tiny_overrides(root: Path, out: Path, **extra) -> list:
    values = {
        "data.roots": f"[{root}]",
        "data.height": TINY_HEIGHT,
        "data.width": TINY_WIDTH,
        "data.batch_size": 8,
        "data.padding": 4,
        "model.pretrained": "null",
        "model.num_branches": 2,
        "model.reduction_dim": 16,
        "loss.k": 2,
        "solver.warmup_epochs": 1,
        "solver.epochs": 1,
        "solver.max_iters_per_epoch": 2,
        "run.output_dir": str(out),
        "run.progress": "false",
        "run.threads": 1,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def tiny_ir(tmp_path_factory) -> Path:
    """A tiny OpenVINO IR shaped as Open Model Zoo's re-ID models (tests/tiny_ir.py), TINY_HEIGHT x TINY_WIDTH."""
    from tests.tiny_ir import omz_like_ir

    return omz_like_ir(tmp_path_factory.mktemp("ir") / "tiny.xml", compress_to_fp16=True)


@pytest.fixture(scope="session")
def tiny_model(market_root, tmp_path_factory):
    """A tiny CAMA (2 branches, D=16, 64x32 input) trained for 36 steps and exported: (checkpoint, onnx).

    Enough steps for its BatchNorm statistics to settle: with fewer, a randomly initialised net maps every
    image to the same embedding."""
    from training import export, load_config, train

    out = tmp_path_factory.mktemp("tiny_model")
    steps = {
        "run.evaluate_at_end": "false",
        "solver.epochs": 8,
        "solver.max_iters_per_epoch": "null",
        "data.sampler": "pk",
        "data.num_instances": 2,
    }
    train(load_config("base.yaml", tiny_overrides(market_root, out, **steps)))
    export(out / "model.pt", out / "model.onnx")
    return out / "model.pt", out / "model.onnx"


def image_bytes(pid: int, variant: int, fmt: str = "JPEG") -> bytes:
    import io

    buffer = io.BytesIO()
    person_image(pid, variant).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def cluster_servers():
    """PostgreSQL and milvus-lite for the cluster backend's tests, started once (skips, saying why, where
    they cannot run)."""
    from harness.cluster import ClusterServers, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    servers = ClusterServers().start()
    yield servers
    servers.stop()
