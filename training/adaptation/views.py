"""Each crop's grid-mean feature maps under the source model, in two views (the image and its mirror): all
the head's training reads, computed once with ONNX Runtime as the service runs the model."""

import numpy as np
from tqdm import tqdm

from model_zoo.contract import INPUT_IMAGES, OUTPUT_FEATURE_MAPS

VIEWS = ("image", "mirror")


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
