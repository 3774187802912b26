"""Each crop's grid-mean feature maps under the source model, in two views (the image and its mirror): all
the head's training reads, computed once with ONNX Runtime as the service runs the model, a batch of decoded
crops at a time."""

from dataclasses import dataclass
from typing import List

import numpy as np
from tqdm import tqdm

from model_zoo.contract import INPUT_IMAGES, OUTPUT_FEATURE_MAPS
from training.adaptation.crops import Crops

VIEWS = ("image", "mirror")


@dataclass
class CropViews:
    views: np.ndarray  # [n, len(VIEWS), N, D]: the pooled maps of each decodable crop and of its mirror image
    cameras: List[str]  # one per row of views
    skipped: int  # crops that could not be decoded

    @property
    def camera_indices(self) -> np.ndarray:
        """Cameras as 0..C-1 (unknown is a camera of its own)."""
        return np.unique(np.array(self.cameras), return_inverse=True)[1].astype(np.int64)


def pooled_maps(session, pixels: np.ndarray, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Grid means of the source's ``feature_maps`` [n, N, D] (float32)."""
    chunks = []
    for start in tqdm(range(0, len(pixels), batch_size), desc="embed", disable=not progress, leave=False):
        (maps,) = session.run([OUTPUT_FEATURE_MAPS], {INPUT_IMAGES: pixels[start : start + batch_size]})
        chunks.append(maps.astype(np.float32).mean(axis=(3, 4)))
    return np.concatenate(chunks)


def pooled_views(session, pixels: np.ndarray, progress: bool = True) -> np.ndarray:
    """[n, len(VIEWS), N, D]: the pooled maps of each crop and of its mirror image."""
    mirrored = np.ascontiguousarray(pixels[:, :, ::-1])
    return np.stack(
        [pooled_maps(session, pixels, progress=progress), pooled_maps(session, mirrored, progress=progress)], 1
    )


def crop_views(session, crops: Crops, height: int, width: int, progress: bool = True) -> CropViews:
    """Every crop decoded, embedded in both views and dropped, a batch at a time."""
    views, cameras, skipped = [], [], 0
    with tqdm(total=len(crops), desc="embed crops", disable=not progress, leave=False) as bar:
        for batch in crops.batches(height, width):
            if len(batch.pixels):
                views.append(pooled_views(session, batch.pixels, progress=False))
            cameras += batch.cameras
            skipped += batch.skipped
            bar.update(len(batch.pixels) + batch.skipped)
    if not views:
        raise ValueError(f"{crops.description}: no image to adapt on ({skipped} could not be decoded)")
    return CropViews(np.concatenate(views), cameras, skipped)
