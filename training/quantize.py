"""Static int8 quantization of an exported model: ``MODEL.onnx`` -> ``MODEL.int8.onnx`` beside it, which the
service loads with REID_MODEL_PRECISION=int8 (contract: model_zoo/CONTRACT.md, "The int8 file").

ONNX Runtime's ``quantize_static`` in the QDQ format (QuantizeLinear/DequantizeLinear pairs around the
quantized nodes): weights int8 per output channel, activations uint8 (u8 x s8 is ONNX Runtime's fast x86
path: 1.2-1.4x the images/s of int8 activations, measured on this CPU), activation ranges calibrated on
training images (``bounding_box_train`` of Market-layout folders, never an evaluation set) decoded by
``model_zoo.preprocess.load_for_model``, the pixels training, evaluation and the service feed the model. The
calibration keeps the 99.999th percentile of |x| by default (min/max and entropy on request): on the shipped
model, agreement 0.99929-0.99934 against min/max's 0.99920-0.99923 over three calibration draws (all figures
and what else was tried: bench/results/int8.json). The graph is first put through ``quant_pre_process``
(shape inference, ONNX Runtime's basic optimisations).

What stays float, and why (figures: the shipped IBN-a model, mean retrieval score between each image's int8
and fp32 embeddings on held-out training images):
- For the contract (``float_nodes``): the nodes only one of the two outputs depends on (pooling, L2
  normalisation, concatenation into ``embedding``) and the nodes that assemble ``feature_maps`` (the
  stacking, and the node that makes each branch's map). Every tensor has one shared Q/DQ pair, so both
  outputs are float functions of the same values: ``embedding`` stays exactly the concatenation of the
  per-branch L2-normalised means of ``feature_maps`` (RAM's identity), checked on the quantized model before it
  is written, as the exporter checks it (``model_zoo.contract.identity_error``); a failure writes nothing.
- Operators: only convolutions and their clipped activations (``DEFAULT_OP_TYPES``). Matrix products stay
  float: no trained architecture's graph has one outside the contract's float nodes, and an imported model's
  head (FC plus bias, per-channel weights) stops ONNX Runtime 1.32's quantizer in its bias-scale step. Adds
  and Muls would also put Q/DQ pairs on the instance norms' arithmetic (IBN-a is exported as ReduceMean,
  Sub, Mul, Add ...): with the Adds quantized, small variances round to zero and the agreement fell to 0.06.
- Everything upstream of a convolution whose output is normalised per image (``normalised_upstream``; here
  trunk blocks 0-9 and block 10's first convolution): instance normalisation divides each channel by its
  spread in the image, which scales up the rounding that reaches it. Quantizing those convolutions:
  agreement 0.82; keeping them float: 0.979 (both with int8 activations, 96 images); with everything
  upstream of them too: 0.9992 (uint8, 128 images), at no cost in speed (measured), since between float
  convolutions the remaining int8 depthwise ones were islands paying a Q/DQ pair each.

Graph optimisation saved with the file: only the basic level (from ``quant_pre_process``), standard ONNX
operators that every execution provider takes. The extended level saved offline already fixes the CPU's
kernels (the QDQ groups fused into QLinearConv), and the *all* level adds a layout for this CPU's vector
width (``com.microsoft.nchwc``), which ONNX Runtime warns is for the machine that wrote it only; ONNX
Runtime's documentation asks for the same execution provider, options and hardware for an offline-optimised
file, while the service picks its provider at start. Done at session creation those levels cost about 0.1 s.
"""

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set

import numpy as np
import onnx

from model_zoo.contract import (
    INPUT_IMAGES,
    METADATA_PREFIX,
    OUTPUT_EMBEDDING,
    OUTPUT_FEATURE_MAPS,
    PRECISION_KEY,
    QUANTIZATION_KEY,
    identity_error,
    open_cpu_session,
    precision_of,
    precision_path,
    split_branches,
)
from model_zoo.files import sha256_of
from model_zoo.preprocess import load_for_model
from training.data.market import read_split
from model_zoo.onnx_export import EMBEDDING_TOLERANCE, PARITY_BATCHES, parity_images

CALIBRATION_SPLIT = "bounding_box_train"
DEFAULT_CALIBRATION_IMAGES = 384
DEFAULT_AGREEMENT_IMAGES = 256
log = logging.getLogger(__name__)
DEFAULT_OP_TYPES = ("Conv", "Clip", "Relu")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
ACTIVATION_TYPES = ("uint8", "int8")
# Data movement between the branches' maps and the ``feature_maps`` output (stacking, casts, reshapes).
DATA_MOVEMENT_OPS = {"Cast", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Transpose"}
NORMALISATION_OPS = {"InstanceNormalization", "LayerNormalization", "GroupNormalization"}
BATCH_SIZE = 16


class QuantizationError(RuntimeError):
    """The int8 (or fp16, training.half_precision) model breaks the contract (its check or the embedding
    identity); no file has been written."""


def calibration_files(data_roots: Sequence[Path], count: int, seed: int = 0) -> List[Path]:
    """``count`` training images drawn at random (fixed seed) from the ``bounding_box_train`` folders of
    ``data_roots`` together, each folder in proportion to its size."""
    files = [record.path for root in data_roots for record in read_split(Path(root) / CALIBRATION_SPLIT)[0]]
    if not files:
        raise ValueError(f"no training images in {', '.join(str(Path(r) / CALIBRATION_SPLIT) for r in data_roots)}")
    order = np.random.default_rng(seed).permutation(len(files))
    return [files[i] for i in order[:count]]


def producers(graph: onnx.GraphProto) -> Dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output}


def upstream(producer: Dict[str, onnx.NodeProto], tensors: Sequence[str]) -> Set[str]:
    """The names of the nodes that compute ``tensors``, and of every node those read from."""
    seen, stack = set(), list(tensors)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in seen:
            seen.add(node.name)
            stack.extend(node.input)
    return seen


def float_nodes(graph: onnx.GraphProto) -> Set[str]:
    """The nodes that must stay in float for the contract (module docstring): those only one of ``embedding``
    and ``feature_maps`` depends on, and those that assemble ``feature_maps`` from the branches' maps."""
    producer = producers(graph)
    assembly, stack = set(), [OUTPUT_FEATURE_MAPS]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in assembly:
            continue
        assembly.add(node.name)
        if node.op_type in DATA_MOVEMENT_OPS:  # the walk stops at the node that makes a branch's map
            stack.extend(node.input)
    return (upstream(producer, [OUTPUT_EMBEDDING]) ^ upstream(producer, [OUTPUT_FEATURE_MAPS])) | assembly


def normalised_upstream(graph: onnx.GraphProto, contract_nodes: Set[str] = frozenset()) -> Set[str]:
    """The convolutions whose output a normalisation computed per image reads (IBN-a's instance norm, exported
    as x - ReduceMean(x) arithmetic, or a normalisation operator), and every node upstream of them: the normalisation
    divides each channel by its spread in this image, which scales up, in the channels of small spread, any
    rounding that reaches it. ``contract_nodes`` (``float_nodes``) are not such readers: the embedding's own
    pooling is a ReduceMean too."""
    readers: Dict[str, list] = {}
    for node in graph.node:
        if node.name not in contract_nodes:
            for tensor in node.input:
                readers.setdefault(tensor, []).append(node)

    def kinds(tensor: str) -> Set[str]:  # the operators that read it, through casts
        found = set()
        for node in readers.get(tensor, []):
            found |= kinds(node.output[0]) if node.op_type in ("Cast", "Identity") else {node.op_type}
        return found

    def normalised(tensor: str) -> bool:  # a normalisation operator, or x - mean(x) as IBN-a exports it
        read_by = kinds(tensor)
        return bool(read_by & NORMALISATION_OPS) or {"ReduceMean", "Sub"} <= read_by

    readers_of_normalised = [node for node in graph.node if node.op_type == "Conv" and normalised(node.output[0])]
    return upstream(producers(graph), [node.output[0] for node in readers_of_normalised])


def first_conv(graph: onnx.GraphProto) -> Set[str]:
    return {next(node.name for node in graph.node if node.op_type == "Conv")}


class _Batches:
    """ONNX Runtime's CalibrationDataReader over decoded images, which the calibration reads one batch at a
    time (``CalibStridedMinMax`` = 1): the histogram methods keep every tensor of a step's batches in memory
    (the shipped model, 384 images: 7.7 GB peak in one step), and fail on unequal batches within one step."""

    def __init__(self, images: np.ndarray, batch_size: int = BATCH_SIZE):
        self.batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        self.rewind()

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._iterator = iter(self.batches[start_index:end_index])

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        batch = next(self._iterator, None)
        return None if batch is None else {INPUT_IMAGES: batch}

    def rewind(self) -> None:
        self._iterator = iter(self.batches)


def agreement(
    fp32_session, reduced_session, images: np.ndarray, num_branches: int, batch_size: int = 32
) -> Dict[str, float]:
    """How close the reduced-precision file's embeddings are to the fp32 file's on ``images``: the retrieval
    score of each image's two embeddings (mean over branches of the cosine, 1 = identical), and the identity
    on the reduced file's outputs (``identity_max``)."""
    scores, identity = [], 0.0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        (reference,) = fp32_session.run([OUTPUT_EMBEDDING], {INPUT_IMAGES: batch})
        embedding, maps = reduced_session.run([OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS], {INPUT_IMAGES: batch})
        identity = max(identity, identity_error(embedding, maps))
        scores.append(
            (split_branches(embedding, num_branches) * split_branches(reference, num_branches)).sum(axis=2).mean(axis=1)
        )
    scores = np.concatenate(scores)
    return {
        "images": len(scores),
        "mean_cosine": float(scores.mean()),
        "min_cosine": float(scores.min()),
        "identity_max": identity,
    }


def check_reduced_file(session, height: int, width: int, precision: str) -> Dict[str, float]:
    """The identity on random images at the exporter's batch sizes, on a session whose contract has been
    checked; raises QuantizationError past the exporter's bound, or if the file does not say ``precision``."""
    if precision_of(session.get_modelmeta().custom_metadata_map) != precision:
        raise QuantizationError(f"{PRECISION_KEY} is not {precision}")
    report = {}
    for name, batch in parity_images(height, width, None).items():
        for size in PARITY_BATCHES:
            embedding, maps = session.run(
                [OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS], {INPUT_IMAGES: np.resize(batch, (size, *batch.shape[1:]))}
            )
            report[f"{name}_batch{size}_identity"] = identity_error(embedding, maps)
    worst = max(report.values())
    if worst > EMBEDDING_TOLERANCE:
        raise QuantizationError(f"identity diff {worst:.2e} (bound {EMBEDDING_TOLERANCE})")
    return report


def open_fp32(model: Path, output: Path, precision: str):
    """(session, contract, metadata) of the fp32 file a reduced-precision ``output`` is made from."""
    if output.resolve() == model.resolve():
        raise ValueError(f"the {precision} file would overwrite {model}")
    fp32, contract = open_cpu_session(model)
    metadata = fp32.get_modelmeta().custom_metadata_map
    if precision_of(metadata) != "fp32":
        raise ValueError(f"{model} is already {precision_of(metadata)}: convert the fp32 file")
    return fp32, contract, metadata


def check_and_write(
    proto: onnx.ModelProto,
    fp32,
    fp32_metadata: Dict[str, str],
    precision: str,
    details: Dict,
    held_out: np.ndarray,
    output: Path,
) -> Dict:
    """Give ``proto`` every ``reid.*`` key of the fp32 file, ``reid.precision`` and ``reid.quantization`` (``details``
    and the agreement with the fp32 file on ``held_out`` training images); check the identity on random and on
    those images; only then write ``output``. Returns the identity report, the agreement in it."""
    del proto.metadata_props[:]
    for key, value in fp32_metadata.items():
        if key.startswith(METADATA_PREFIX):
            proto.metadata_props.add(key=key, value=value)
    proto.metadata_props.add(key=PRECISION_KEY, value=precision)
    details_entry = proto.metadata_props.add(key=QUANTIZATION_KEY)
    reduced, contract = open_cpu_session(proto.SerializeToString())  # checked before anything is written
    identity = check_reduced_file(reduced, contract.input_height, contract.input_width, precision)
    agreed = agreement(fp32, reduced, held_out, contract.num_branches)
    if agreed["identity_max"] > EMBEDDING_TOLERANCE:
        raise QuantizationError(
            f"identity diff {agreed['identity_max']:.2e} on training images (bound {EMBEDDING_TOLERANCE})"
        )
    details["agreement"] = {k: v for k, v in agreed.items() if k != "identity_max"}
    details_entry.value = json.dumps(details)  # metadata only: the graph checked above is the graph written
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(output))
    return {**identity, "training_images": agreed["identity_max"]}


def quantize_graph(
    model: Path,
    calibration_pixels: np.ndarray,
    method: str,
    per_channel: bool,
    reduce_range: bool,
    activations: str,
    exclude_first_conv: bool,
    op_types: Optional[Sequence[str]],
):
    """ONNX Runtime's pre-processing and QDQ quantization of ``model``, the module docstring's nodes kept float:
    (quantized ModelProto, convolutions kept float, convolutions)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    with tempfile.TemporaryDirectory(prefix="quantize.") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "quantized.onnx"
        source = str(Path(model).resolve())
        try:
            # symbolic + ONNX shape inference, ORT's basic optimisation level; in the temporary folder, where ORT
            # leaves sym_shape_infer_temp.onnx and its data when its symbolic inference stops short
            with contextlib.chdir(tmp):
                quant_pre_process(source, str(prepared))
        except Exception as exc:  # noqa: BLE001  ORT raises a bare Exception there
            # An imported model's graph (model_zoo.importers) reshapes by computed sizes, which ORT's symbolic
            # inference does not follow; ONNX's own shape inference is enough for the quantizer.
            log.info("symbolic shape inference stopped (%s): ONNX shape inference only", exc)
            quant_pre_process(source, str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared)).graph
        contract_nodes = float_nodes(graph)
        excluded = (
            contract_nodes
            | normalised_upstream(graph, contract_nodes)
            | (first_conv(graph) if exclude_first_conv else set())
        )
        convolutions = [node.name for node in graph.node if node.op_type == "Conv"]
        quantize_static(
            str(prepared),
            str(quantized),
            _Batches(calibration_pixels),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types) if op_types else None,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(excluded),
            calibrate_method=methods[method],
            extra_options={"CalibStridedMinMax": 1},
        )
        return onnx.load(str(quantized)), len(excluded.intersection(convolutions)), len(convolutions)


def quantize_model(
    model: Path,
    data_roots: Sequence[Path],
    output: Optional[Path] = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    agreement_images: int = DEFAULT_AGREEMENT_IMAGES,
    method: str = "percentile",
    per_channel: bool = True,
    reduce_range: bool = False,
    activations: str = "uint8",
    exclude_first_conv: bool = False,
    op_types: Optional[Sequence[str]] = DEFAULT_OP_TYPES,
    seed: int = 0,
) -> Dict:
    """Write the int8 file of the fp32 ``model`` (default ``MODEL.int8.onnx`` beside it) and return a summary:
    the file, its size, how it was calibrated, the int8-vs-fp32 agreement on ``agreement_images`` training
    images not used for calibration, and the identity checks.

    ``data_roots``: Market-layout folders whose ``bounding_box_train`` images calibrate (never an evaluation
    set). ``method``: minmax, percentile or entropy. ``op_types``: operator types to quantize (None: ONNX
    Runtime's whole list). ``exclude_first_conv``: keep the first convolution in float too. Every ``reid.*``
    metadata key of the fp32 file is copied (``reid.evaluation`` stays the fp32 file's figures), with
    ``reid.precision`` = int8 and ``reid.quantization`` (how, on what, and the agreement) added."""
    from onnxruntime import __version__ as ort_version

    model = Path(model)
    output = Path(output) if output else precision_path(model, "int8")
    if method not in CALIBRATION_METHODS or activations not in ACTIVATION_TYPES:
        raise ValueError(
            f"calibration method {method!r} (one of {', '.join(CALIBRATION_METHODS)}), activations "
            f"{activations!r} (one of {', '.join(ACTIVATION_TYPES)})"
        )
    started = time.perf_counter()
    fp32, contract, fp32_metadata = open_fp32(model, output, "int8")
    files = calibration_files(data_roots, calibration_images + agreement_images, seed)
    if len(files) <= calibration_images:
        raise ValueError(
            f"{len(files)} training images: more than the {calibration_images} calibration images are "
            f"needed, to measure the agreement on others"
        )
    size = (contract.input_height, contract.input_width)
    calibration, held_out = (
        np.stack([load_for_model(path, *size) for path in part])
        for part in (files[:calibration_images], files[calibration_images:])
    )
    proto, float_convolutions, convolutions = quantize_graph(
        model, calibration, method, per_channel, reduce_range, activations, exclude_first_conv, op_types
    )
    quantization = {
        "format": "QDQ",
        "weights": "int8 per channel" if per_channel else "int8 per tensor",
        "activations": activations,
        "reduce_range": reduce_range,
        "calibration_method": method,
        "calibration_images": len(calibration),
        "calibration_data": " + ".join(f"{Path(root).name}/{CALIBRATION_SPLIT}" for root in data_roots),
        "seed": seed,
        "op_types": sorted(op_types) if op_types else "onnxruntime default",
        "float_convolutions": f"{float_convolutions} of {convolutions}",
        "exclude_first_conv": exclude_first_conv,
        "onnxruntime": ort_version,
        "fp32_file": model.name,
        "fp32_sha256": sha256_of(model),
    }
    identity = check_and_write(proto, fp32, fp32_metadata, "int8", quantization, held_out, output)
    return {
        "output": str(output),
        "bytes": output.stat().st_size,
        "fp32_bytes": model.stat().st_size,
        "quantization": quantization,
        "identity": identity,
        "seconds": round(time.perf_counter() - started, 1),
    }
