"""Write a torch re-ID module as a contract ONNX file and check ONNX Runtime against PyTorch
(model_zoo/CONTRACT.md, "Guarantees checked at export"): the one writer behind ``python -m training export``
and ``python -m model_zoo import``. Imports torch and onnx (the ``train`` extra); never imported by the service."""

import warnings
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from model_zoo.contract import (
    INPUT_IMAGES,
    OPTIONAL_OUTPUTS,
    OUTPUT_EMBEDDING,
    OUTPUT_FEATURE_MAPS,
    ModelContract,
    identity_error,
    split_branches,
    open_cpu_session,
)
from model_zoo.preprocess import load_for_model

EMBEDDING_TOLERANCE = 1e-4
# max|F_i| / |mean F_i| of a well-conditioned branch: above it, a branch's embedding bound grows in proportion
CONDITIONING_REFERENCE = 5.0
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


def optional_outputs(model: nn.Module, images: torch.Tensor) -> list:
    """The contract's optional outputs that ``model`` gives in eval mode (its output's ``aux``), in contract order."""
    with torch.no_grad():
        aux = model.eval()(images).aux
    return [name for name in OPTIONAL_OUTPUTS if name in aux]


def contract_shape(model: nn.Module, height: int, width: int) -> Dict:
    """The contract's shape fields of ``model`` at this input size (N, D, the map's grid, its kind), read off one
    eval-mode pass over a blank image: what every writer of a contract file records."""
    with torch.no_grad():
        _, branches, dim, map_h, map_w = model(torch.zeros(1, height, width, 3, dtype=torch.uint8)).feature_maps.shape
    return {
        "num_branches": branches,
        "branch_dim": dim,
        "map_height": map_h,
        "map_width": map_w,
        "input_height": height,
        "input_width": width,
        "feature_maps_kind": getattr(model, "feature_maps_kind", "activations"),
    }


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
                kept = (
                    np.ones(out.feature_maps.shape[:3], bool)
                    if margins is None
                    else (margins(torch.from_numpy(x)) >= NEAR_TIE_TOLERANCE).numpy()
                )
            emb, maps, *extra = session.run([OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS, *extras], {INPUT_IMAGES: x})
            emb_diffs = np.abs(emb - out.embedding.numpy())
            emb_diff = float(emb_diffs.max())
            torch_maps = out.feature_maps.float().numpy()
            slice_diffs = split_branches(emb_diffs, maps.shape[1]).max(axis=2)
            emb_excess = float((slice_diffs / embedding_bounds(torch_maps)).max())
            map_scale = max(1.0, float(np.abs(maps).max()))
            map_diff = float(np.abs(maps - torch_maps)[kept].max(initial=0.0)) / map_scale
            # The identity on the ONNX outputs alone: 0 up to rounding where the graph computes the embedding from the
            # maps.
            identity_diff = identity_error(emb, maps)
            report[f"{name}_batch{size}_embedding"] = emb_diff
            report[f"{name}_batch{size}_feature_maps_relative"] = map_diff
            report[f"{name}_batch{size}_identity"] = identity_diff
            report[f"{name}_batch{size}_channels_left_out"] = int(kept.size - kept.sum())
            for output, values in zip(extras, extra):
                scale = max(1.0, float(np.abs(values).max()))
                diff = report[f"{name}_batch{size}_{output}"] = (
                    float(np.abs(values - out.aux[output].float().numpy()).max()) / scale
                )
                if beyond(diff, EMBEDDING_TOLERANCE):
                    raise ExportParityError(
                        f"{name} batch {size}: {output} diff {diff:.2e} (bound {EMBEDDING_TOLERANCE})"
                    )
            print(
                f"parity {name:6s} batch {size}: max |d embedding| = {emb_diff:.2e}, max |d F| / max|F| = "
                f"{map_diff:.2e}, identity {identity_diff:.2e}, {kept.size - kept.sum()} channels left out"
            )
            if (
                beyond(emb_excess, 1.0)
                or beyond(map_diff, FEATURE_MAP_TOLERANCE)
                or beyond(identity_diff, EMBEDDING_TOLERANCE)
            ):
                raise ExportParityError(
                    f"{name} batch {size}: embedding diff {emb_diff:.2e} ({emb_excess:.2f} of its branch's bound, "
                    f"{EMBEDDING_TOLERANCE} when well conditioned), feature map diff {map_diff:.2e} (bound "
                    f"{FEATURE_MAP_TOLERANCE}), "
                    f"identity diff {identity_diff:.2e} (bound {EMBEDDING_TOLERANCE})"
                )
    return report


def embedding_bounds(feature_maps: np.ndarray) -> np.ndarray:
    """[B, N]: each embedding slice's parity bound, EMBEDDING_TOLERANCE grown in proportion to the branch's
    max|F_i| / |mean F_i| above CONDITIONING_REFERENCE. A slice is its descriptor normalised, so the maps' rounding
    (a fraction of their largest value) reaches it divided by the descriptor's norm: a branch whose descriptor is
    small beside its maps is that much less precise in either runtime."""
    norms = np.linalg.norm(feature_maps.mean(axis=(3, 4)), axis=2)
    ratios = np.abs(feature_maps).max(axis=(2, 3, 4)) / np.maximum(norms, 1e-12)
    return EMBEDDING_TOLERANCE * np.maximum(1.0, ratios / CONDITIONING_REFERENCE)


def beyond(difference: float, bound: float) -> bool:
    """Past the bound, or not a number: a NaN difference (a NaN in either runtime's output) compares below
    every bound, and must fail the check instead."""
    return not difference <= bound


def zero_subnormal_weights(proto: onnx.ModelProto) -> int:
    """Set the float32 weights smaller in magnitude than float32's smallest normal number to zero; returns how many.

    A long schedule with weight decay leaves thousands of weights (after the exporter folds batch norms into
    the convolutions) subnormal. They change no output, but x86 CPUs multiply subnormal operands in microcode:
    the full-schedule default, 7,313 of them in its 1x1 convolutions, embedded at 0.6x the images/s of the same
    graph with them zeroed, its embeddings equal to the last bit (docs/results.md, "Subnormal weights")."""
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


def write_onnx(
    model: nn.Module, contract: ModelContract, output: Path, opset: int = 17, metadata: Optional[Dict[str, str]] = None
) -> int:
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
            ContractOutputs(model, extras).eval(),
            (dummy,),
            str(output),
            input_names=[INPUT_IMAGES],
            output_names=names,
            opset_version=opset,
            dynamo=False,
            keep_initializers_as_inputs=True,
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
