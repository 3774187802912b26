"""Export a trained checkpoint to the ONNX file the service loads (contract: model_zoo/CONTRACT.md), then
check ONNX Runtime against PyTorch on random and real images at batch 1 and 7; a failed check deletes the
file and raises. With ``flip``, the graph averages each image with its mirror image (``FlipAveraged``)."""
import json
import logging
import warnings
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from model_zoo.architectures.common import ReIDOutput
from model_zoo.contract import (FLIP_KEY, INPUT_IMAGES, OPTIONAL_OUTPUTS, OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS, ModelContract, identity_error,
                                open_cpu_session)
from model_zoo.files import sha256_of
from model_zoo.pair_attention import pair_head_path
from model_zoo.preprocess import load_for_model
from training.engine import load_trained_model

log = logging.getLogger(__name__)
EMBEDDING_TOLERANCE = 1e-4
FEATURE_MAP_TOLERANCE = 1e-3  # relative to the largest |F| value
NEAR_TIE_TOLERANCE = 1e-5  # attribution maps: channels whose selection margin is below it are left out of the map check
PARITY_BATCHES = (1, 7)


class ExportParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


class ContractOutputs(nn.Module):
    """uint8 images -> (embedding, feature_maps), the two outputs the contract names, then the optional ones in
    ``extras`` (names in ``OPTIONAL_OUTPUTS``), read from the eval-mode output's ``aux``."""

    def __init__(self, model: nn.Module, extras=()):
        super().__init__()
        self.model, self.extras = model, tuple(extras)

    def forward(self, images: torch.Tensor):
        out = self.model(images)
        return (out.embedding, out.feature_maps.float(), *(out.aux[name].float() for name in self.extras))


class FlipAveraged(nn.Module):
    """Test-time flip inside the graph: each image's maps averaged with its mirror image's maps mirrored back
    (the optional attention maps too). The embedding, built from the averaged maps, is then the flip-averaged
    descriptor, the same for an image and its mirror, and RAM's identity still holds; the model's work doubles.
    On the shipped default's checkpoint: mAP +1.2 on CUHK03-val, +1.1 on PRID, +0.7 on GRID (README)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.feature_maps_kind = getattr(model, "feature_maps_kind", "activations")
        if hasattr(model, "selection_margins"):  # attribution maps: a channel is near a tie if it is in either pass
            self.selection_margins = lambda images: torch.minimum(model.selection_margins(images), model.selection_margins(images.flip(2)))

    def forward(self, images: torch.Tensor) -> ReIDOutput:
        both = self.model(torch.cat([images, images.flip(2)]))  # one pass over the images and their mirrors

        def averaged(maps: torch.Tensor) -> torch.Tensor:
            plain, mirrored = maps.chunk(2)
            return (plain + mirrored.flip(-1)) / 2

        aux = {name: averaged(both.aux[name]) for name in OPTIONAL_OUTPUTS if name in both.aux}
        return ReIDOutput(feature_maps=averaged(both.feature_maps), aux=aux)


def optional_outputs(model: nn.Module, images: torch.Tensor) -> list:
    """The contract's optional outputs that ``model`` gives in eval mode (its output's ``aux``), in contract order."""
    with torch.no_grad():
        aux = model.eval()(images).aux
    return [name for name in OPTIONAL_OUTPUTS if name in aux]


def describe(model: nn.Module, cfg, evaluation: Optional[Dict]) -> ModelContract:
    height, width = cfg.data.height, cfg.data.width
    with torch.no_grad():
        maps = model(torch.zeros(1, height, width, 3, dtype=torch.uint8)).feature_maps
    _, branches, dim, map_h, map_w = maps.shape
    return ModelContract(
        architecture=cfg.model.architecture, backbone=cfg.model.backbone, num_branches=branches, branch_dim=dim,
        map_height=map_h, map_width=map_w, input_height=height, input_width=width,
        training_data=" + ".join(Path(root).name for root in cfg.data.roots), evaluation=evaluation or {},
        config=cfg.to_dict(), feature_maps_kind=getattr(model, "feature_maps_kind", "activations"),
    )


def parity_images(height: int, width: int, real_images: Optional[Path], count: int = 7) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    sets = {"random": rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)}
    if real_images:
        files = sorted(p for p in Path(real_images).iterdir() if p.is_file())[:count]
        if files:
            sets["real"] = np.stack([load_for_model(p, height, width) for p in files])
    return sets


def check_parity(model: nn.Module, onnx_path: Path, images: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Max |ORT - torch| on each image set at each batch size; raises ExportParityError past the bounds.

    For ``attribution`` maps (the file's ``feature_maps_kind``) a near-tied selection may move a spike between
    runtimes, so the rule is model_zoo/CONTRACT.md's: the embedding, the identity on the ONNX outputs, and the
    maps without the channels whose ``model.selection_margins(images)`` [B, N, D] is below NEAR_TIE_TOLERANCE.
    Optional outputs (``attention_maps``, ``pair_maps``) are held to the embedding's bound, relative to their
    largest value where it is above 1."""
    session, contract = open_cpu_session(onnx_path)
    attribution = contract.feature_maps_kind == "attribution"
    margins = getattr(model, "selection_margins", None) if attribution else None
    extras = [node.name for node in session.get_outputs() if node.name in OPTIONAL_OUTPUTS]
    model.eval()
    report = {}
    for name, batch in images.items():
        for size in PARITY_BATCHES:
            x = np.resize(batch, (size, *batch.shape[1:]))
            with torch.no_grad():
                out = model(torch.from_numpy(x))
                kept = np.ones(out.feature_maps.shape[:3], bool) if margins is None else (margins(torch.from_numpy(x)) >= NEAR_TIE_TOLERANCE).numpy()
            emb, maps, *extra = session.run([OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS, *extras], {INPUT_IMAGES: x})
            emb_diff = float(np.abs(emb - out.embedding.numpy()).max())
            map_scale = max(1.0, float(np.abs(maps).max()))
            map_diff = float(np.abs(maps - out.feature_maps.float().numpy())[kept].max(initial=0.0)) / map_scale
            # The identity on the ONNX outputs alone: 0 up to rounding where the graph computes the embedding from the maps.
            identity_diff = identity_error(emb, maps)
            report[f"{name}_batch{size}_embedding"] = emb_diff
            report[f"{name}_batch{size}_feature_maps_relative"] = map_diff
            report[f"{name}_batch{size}_identity"] = identity_diff
            report[f"{name}_batch{size}_channels_left_out"] = int(kept.size - kept.sum())
            for output, values in zip(extras, extra):
                scale = max(1.0, float(np.abs(values).max()))
                diff = report[f"{name}_batch{size}_{output}"] = float(np.abs(values - out.aux[output].float().numpy()).max()) / scale
                if beyond(diff, EMBEDDING_TOLERANCE):
                    raise ExportParityError(f"{name} batch {size}: {output} diff {diff:.2e} (bound {EMBEDDING_TOLERANCE})")
            print(f"parity {name:6s} batch {size}: max |d embedding| = {emb_diff:.2e}, max |d F| / max|F| = {map_diff:.2e}, identity {identity_diff:.2e}, {kept.size - kept.sum()} channels left out")
            if beyond(emb_diff, EMBEDDING_TOLERANCE) or beyond(map_diff, FEATURE_MAP_TOLERANCE) or beyond(identity_diff, EMBEDDING_TOLERANCE):
                raise ExportParityError(f"{name} batch {size}: embedding diff {emb_diff:.2e} (bound {EMBEDDING_TOLERANCE}), feature map diff {map_diff:.2e} (bound {FEATURE_MAP_TOLERANCE}), "
                                        f"identity diff {identity_diff:.2e} (bound {EMBEDDING_TOLERANCE})")
    return report


def beyond(difference: float, bound: float) -> bool:
    """Past the bound, or not a number: a NaN difference (a NaN in either runtime's output) compares below
    every bound, and must fail the check instead."""
    return not difference <= bound


def zero_subnormal_weights(proto: onnx.ModelProto) -> int:
    """Set the float32 weights smaller in magnitude than float32's smallest normal number to zero; returns how many.

    A long schedule with weight decay leaves thousands of weights (after the exporter folds batch norms into
    the convolutions) subnormal. They change no output, but x86 CPUs multiply subnormal operands in microcode:
    the full-schedule default, 7,313 of them in its 1x1 convolutions, embedded at 0.6x the images/s of the same
    graph with them zeroed, its embeddings equal to the last bit (README, "Subnormal weights")."""
    smallest_normal = np.finfo(np.float32).tiny
    zeroed = 0
    for tensor in proto.graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        weights = numpy_helper.to_array(tensor)
        subnormal = (weights != 0) & (np.abs(weights) < smallest_normal)
        if subnormal.any():
            zeroed += int(subnormal.sum())
            tensor.CopyFrom(numpy_helper.from_array(np.where(subnormal, np.float32(0), weights), tensor.name))
    return zeroed


def write_onnx(model: nn.Module, contract: ModelContract, output: Path, opset: int = 17, metadata: Optional[Dict[str, str]] = None) -> int:
    """The model's contract outputs (and the optional ones it gives) as an ONNX graph at ``output``, with the
    contract's metadata and ``metadata`` (no parity check); returns how many subnormal weights it zeroed."""
    output = Path(output)
    dummy = torch.zeros(2, contract.input_height, contract.input_width, 3, dtype=torch.uint8)
    output.parent.mkdir(parents=True, exist_ok=True)
    extras = optional_outputs(model, dummy)
    names = [OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS, *extras]
    # The TorchScript exporter: on this CPU it exports in seconds where dynamo=True takes about a minute, for
    # an equivalent graph; torch is pinned, and the parity check guards the result either way. Its pass that
    # merges parameter tensors of equal values breaks graphs that hold such tensors (FMN's LAN before training
    # is an ImageNet copy of the GRN; fresh batch norms are all ones): a node is left reading a merged-away
    # name and ONNX Runtime refuses the file. keep_initializers_as_inputs skips that pass; the parameters are
    # then taken back out of the graph's inputs, which the contract says are the images alone.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            ContractOutputs(model, extras).eval(), (dummy,), str(output), input_names=[INPUT_IMAGES],
            output_names=names, opset_version=opset, dynamo=False, keep_initializers_as_inputs=True,
            dynamic_axes={name: {0: "batch"} for name in [INPUT_IMAGES, *names]},
        )
    proto = onnx.load(str(output))
    parameters = {tensor.name for tensor in proto.graph.initializer}
    images_only = [node for node in proto.graph.input if node.name not in parameters]
    del proto.graph.input[:]
    proto.graph.input.extend(images_only)
    for key, value in {**contract.to_metadata(), **(metadata or {})}.items():
        proto.metadata_props.add(key=key, value=value)
    zeroed = zero_subnormal_weights(proto)
    onnx.save(proto, str(output))
    return zeroed


def export_onnx(checkpoint: Path, output: Path, real_images: Optional[Path] = None, evaluation: Optional[Path] = None, opset: int = 17,
                flip: bool = False) -> Dict:
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
    summary = {"output": str(output), "bytes": output.stat().st_size, "subnormal_weights_zeroed": zeroed, "parity": report,
               "contract": contract.to_metadata()}
    return {**summary, **export_pair_head(model, cfg, output)}


def export_pair_head(model: nn.Module, cfg, output: Path) -> Dict:
    """CASN: the pair head beside the ONNX file, bound to it by its sha256 (model_zoo/pair_attention.py); other
    architectures (and a flip-averaged graph) have none."""
    make = getattr(model, "pair_head_artifact", None)
    if make is None:
        return {}
    make(sha256_of(output), cfg.loss.casn_row_threshold).save(pair_head_path(output))
    return {"pair_head": str(pair_head_path(output))}
