"""Export a trained checkpoint to the ONNX file the service loads (contract: model_zoo/CONTRACT.md), then
check ONNX Runtime against PyTorch on random and real images at batch 1 and 7; a failed check deletes the
file and raises. With ``flip``, the graph averages each image with its mirror image (``FlipAveraged``)."""

import json
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from model_zoo.architectures.common import ReIDOutput
from model_zoo.contract import FLIP_KEY, OPTIONAL_OUTPUTS, ModelContract
from model_zoo.files import sha256_of
from model_zoo.onnx_export import check_parity, contract_shape, parity_images, write_onnx
from model_zoo.pair_attention import pair_head_path
from training.checkpoints import load_trained_model


class FlipAveraged(nn.Module):
    """Test-time flip inside the graph: each image's maps averaged with its mirror image's maps mirrored back
    (the optional attention maps too). The embedding, built from the averaged maps, is then the flip-averaged
    descriptor, the same for an image and its mirror, and RAM's identity still holds; the model's work doubles.
    On the shipped default's checkpoint: mAP +1.2 on CUHK03-val, +1.1 on PRID, +0.7 on GRID (docs/results.md)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.feature_maps_kind = getattr(model, "feature_maps_kind", "activations")
        if hasattr(model, "selection_margins"):  # attribution maps: a channel is near a tie if it is in either pass
            self.selection_margins = lambda images: torch.minimum(
                model.selection_margins(images), model.selection_margins(images.flip(2))
            )

    def forward(self, images: torch.Tensor) -> ReIDOutput:
        both = self.model(torch.cat([images, images.flip(2)]))  # one pass over the images and their mirrors

        def averaged(maps: torch.Tensor) -> torch.Tensor:
            plain, mirrored = maps.chunk(2)
            return (plain + mirrored.flip(-1)) / 2

        aux = {name: averaged(both.aux[name]) for name in OPTIONAL_OUTPUTS if name in both.aux}
        return ReIDOutput(feature_maps=averaged(both.feature_maps), aux=aux)


def describe(model: nn.Module, cfg, evaluation: Optional[Dict]) -> ModelContract:
    return ModelContract(
        architecture=cfg.model.architecture,
        backbone=cfg.model.backbone,
        **contract_shape(model, cfg.data.height, cfg.data.width),
        training_data=" + ".join(Path(root).name for root in cfg.data.roots),
        evaluation=evaluation or {},
        config=cfg.portable_dict(),
    )


def export_onnx(
    checkpoint: Path,
    output: Path,
    real_images: Optional[Path] = None,
    evaluation: Optional[Path] = None,
    opset: int = 17,
    flip: bool = False,
) -> Dict:
    """Export ``checkpoint`` to ``output`` with the contract's metadata; returns the parity report.

    ``real_images``: a folder of images for the parity check (default: the training data's query folder).
    ``evaluation``: a metrics.json whose ``evaluation`` figures go into the metadata (default: the run's; with
    ``flip`` they are the plain model's, so none are written unless given).
    ``flip``: the graph averages each image with its mirror image (``FlipAveraged``, ``reid.test_time_flip``).
    """
    checkpoint, output = Path(checkpoint), Path(output)
    model, cfg = load_trained_model(checkpoint)
    if flip:
        model = FlipAveraged(model).eval()
    metrics_file = Path(evaluation) if evaluation else None if flip else checkpoint.parent / "metrics.json"
    figures = json.loads(metrics_file.read_text()).get("evaluation") if metrics_file and metrics_file.exists() else None
    contract = describe(model, cfg, figures)
    if real_images is None:
        real_images = next((Path(root) / "query" for root in cfg.data.roots if (Path(root) / "query").is_dir()), None)
    zeroed = write_onnx(model, contract, output, opset, {FLIP_KEY: "true"} if flip else None)
    try:
        report = check_parity(model, output, parity_images(cfg.data.height, cfg.data.width, real_images))
    except Exception:
        output.unlink(missing_ok=True)
        raise
    summary = {
        "output": str(output),
        "bytes": output.stat().st_size,
        "subnormal_weights_zeroed": zeroed,
        "parity": report,
        "contract": contract.to_metadata(),
    }
    return {**summary, **export_pair_head(model, cfg, output)}


def export_pair_head(model: nn.Module, cfg, output: Path) -> Dict:
    """CASN: the pair head beside the ONNX file, bound to it by its sha256 (model_zoo/pair_attention.py); other
    architectures (and a flip-averaged graph) have none."""
    make = getattr(model, "pair_head_artifact", None)
    if make is None:
        return {}
    make(sha256_of(output), cfg.loss.casn_row_threshold).save(pair_head_path(output))
    return {"pair_head": str(pair_head_path(output))}
