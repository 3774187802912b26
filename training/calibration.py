"""Same person or not: the verification threshold of a model, calibrated on validation data.

Every pair of images of a validation set is scored as the service scores it (the mean over branches of the
cosine similarity). Genuine pairs are one person seen by two different cameras (the re-ID question);
impostor pairs are two people. The ROC gives, per target false-match rate (FMR: the share of impostor pairs
called the same person), the threshold and the true-match rate (TMR) it keeps. The threshold at the chosen
target goes into the model file's metadata (``reid.verification``, model_zoo/CONTRACT.md) with the ROC it came
from and, for every further set given, the FMR and TMR that threshold reaches there (a check on cameras it was
not calibrated on, never a second calibration).
"""

import json
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import onnx

from model_zoo.contract import VERIFICATION_KEY

ROC_FMRS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
CHUNK = 1024


def pair_scores(embeddings: np.ndarray, pids: Sequence[int], cams: Sequence[int], num_branches: int):
    """(genuine scores, impostor scores) over all unordered pairs of the images: same person on different
    cameras, and different people (same person, same camera: neither)."""
    pids, cams = np.asarray(pids), np.asarray(cams)
    genuine, impostor = [], []
    for start in range(0, len(embeddings), CHUNK):
        rows = slice(start, start + CHUNK)
        scores = embeddings[rows] @ embeddings.T / num_branches
        later = np.arange(len(embeddings))[None, :] > np.arange(start, start + len(scores))[:, None]  # each pair once
        same = pids[rows, None] == pids[None, :]
        genuine.append(scores[later & same & (cams[rows, None] != cams[None, :])])
        impostor.append(scores[later & ~same])
    return np.concatenate(genuine), np.concatenate(impostor)


def threshold_at(impostor: np.ndarray, target_fmr: float) -> float:
    """The lowest threshold t whose rule "same person when score > t" lets at most target_fmr of the impostor
    pairs through."""
    allowed = int(np.floor(target_fmr * len(impostor)))
    if allowed >= len(impostor):
        return -1.0
    return float(-np.partition(-impostor, allowed)[allowed])  # the (allowed+1)-th largest impostor score


def rates(genuine: np.ndarray, impostor: np.ndarray, threshold: float) -> Dict[str, float]:
    return {
        "fmr": float(np.mean(impostor > threshold)),
        "tmr": float(np.mean(genuine > threshold)),
        "genuine_pairs": int(len(genuine)),
        "impostor_pairs": int(len(impostor)),
    }


def roc(genuine: np.ndarray, impostor: np.ndarray, fmrs: Sequence[float] = ROC_FMRS) -> List[Dict[str, float]]:
    points = []
    for target in fmrs:
        threshold = threshold_at(impostor, target)
        found = rates(genuine, impostor, threshold)
        points.append(
            {"target_fmr": target, "threshold": round(threshold, 6), "fmr": found["fmr"], "tmr": found["tmr"]}
        )
    return points


def calibrate(embed_set, roots: Sequence[Path], target_fmr: float = 1e-3) -> Dict:
    """The ``reid.verification`` record: calibrated on ``roots[0]``, checked on the rest. ``embed_set(root)`` gives
    (embeddings [n, N*D], person ids, camera ids, N) of a set's test images (query and gallery together)."""
    first, *others = roots
    genuine, impostor = pair_scores(*embed_set(first))
    threshold = threshold_at(impostor, target_fmr)
    record = {
        "threshold": round(threshold, 6),
        "target_fmr": target_fmr,
        "rule": "same person when score > threshold",
        "calibrated_on": Path(first).name,
        **rates(genuine, impostor, threshold),
        "roc": roc(genuine, impostor),
    }
    record["held_out"] = {Path(root).name: rates(*pair_scores(*embed_set(root)), threshold) for root in others}
    return record


def onnx_set_embedder(model_path: Path, progress: bool = True):
    """``embed_set`` for ``calibrate`` from an ONNX model file, through ONNX Runtime as the service runs it."""
    from model_zoo.contract import open_cpu_session
    from training.evaluation import load_test_split, onnx_branch_features

    session, contract = open_cpu_session(model_path)

    def embed_set(root: Path):
        query_images, query, gallery_images, gallery = load_test_split(
            root, contract.input_height, contract.input_width, progress
        )
        features = onnx_branch_features(
            session, np.concatenate([query_images, gallery_images]), contract.num_branches, progress=progress
        )
        records = query + gallery
        return (
            features.reshape(len(features), -1),
            [r.pid for r in records],
            [r.camid for r in records],
            contract.num_branches,
        )

    return embed_set


def write_verification(model_path: Path, record: Dict) -> None:
    """Store the record in the model file's metadata, in place (the file's sha256, its fingerprint, changes)."""
    model = onnx.load(str(model_path))
    kept = [p for p in model.metadata_props if p.key != VERIFICATION_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=VERIFICATION_KEY, value=json.dumps(record))
    onnx.save(model, str(model_path))
