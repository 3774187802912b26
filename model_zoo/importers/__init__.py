"""Import public re-ID models as contract ONNX files the service serves unchanged, heatmaps included.

``import_model(source, output)`` reads a model in another format into a trainable torch module whose
``feature_maps`` decompose its own embedding exactly (``exact_head``), writes it through the exporter's
writer and parity check (``model_zoo.onnx_export``) and records where it came from (``reid.source``: format,
file names and sha256, licence, address). Formats: OpenVINO IR (``openvino_ir``: an ``.xml`` beside its
``.bin``), plain ONNX embedding models (``onnx``: translated to the IR importer's graph, ``onnx_graph``) and
torchreid OSNet checkpoints (``torchreid_osnet``: a ``.pth``/``.pt`` state dict). The imported file is also
checked against the source run by its own runtime on the parity images: OpenVINO for an IR (where the
``openvino`` package is installed), ONNX Runtime for an ONNX file.

Imports torch and onnx (the ``train`` extra); never imported by the service.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from model_zoo.contract import INPUT_IMAGES, OUTPUT_EMBEDDING, SOURCE_KEY, ModelContract, open_cpu_session
from model_zoo.files import sha256_of
from model_zoo.importers import onnx_graph, openvino_ir, torchreid_osnet
from model_zoo.onnx_export import (
    EMBEDDING_TOLERANCE,
    ExportParityError,
    check_parity,
    contract_shape,
    parity_images,
    write_onnx,
)

TORCHREID_INPUT = (256, 128)  # torchreid's default height x width


@dataclass
class Provenance:
    """What ``reid.source`` says about an imported file; ``licence`` and ``url`` are the user's to give."""

    licence: str = "unknown"
    url: str = ""
    training_data: str = "not stated by the source"
    notes: Dict[str, str] = field(default_factory=dict)


@dataclass
class Preprocessing:
    """What a plain ONNX model expects of its input, in pixel units: (x - mean) / scale per channel, in the
    channel order the importer is told (OpenVINO's ``mean_values`` / ``scale_values``). IRs and torchreid
    checkpoints carry their own."""

    mean: Sequence[float] = (0.0, 0.0, 0.0)
    scale: Sequence[float] = (1.0, 1.0, 1.0)


def source_format(source: Path) -> str:
    if source.suffix.lower() == ".xml":
        return "openvino_ir"
    if source.suffix.lower() == ".onnx":
        return "onnx"
    if source.suffix.lower() in (".pth", ".pt", ".tar"):
        return "torchreid_osnet"
    raise ValueError(
        f"{source.name}: cannot tell the format (known: OpenVINO IR .xml beside its .bin, ONNX .onnx, "
        "torchreid OSNet .pth)"
    )


@dataclass
class Loaded:
    model: torch.nn.Module
    name: str  # the architecture the source is (reid.backbone)
    height: int
    width: int
    channel_order: str
    files: List[Path]


def load_source(
    source: Path,
    channel_order: Optional[str] = None,
    input_size: Optional[Tuple[int, int]] = None,
    preprocessing: Optional[Preprocessing] = None,
) -> Loaded:
    """The source as a contract model in eval mode, with what the file records about it."""
    kind = source_format(source)
    if preprocessing is not None and kind != "onnx":
        raise ValueError("mean and scale are for plain ONNX models: an IR or a torchreid checkpoint has its own")
    if kind == "onnx":
        graph = onnx_graph.read_onnx(source, **vars(preprocessing or Preprocessing()))
        order = channel_order or "rgb"
        return Loaded(
            openvino_ir.contract_model(graph, order).eval(),
            source.stem,
            *openvino_ir.input_size(graph),
            order,
            [source],
        )
    if kind == "openvino_ir":
        graph = openvino_ir.read_ir(source)
        order = channel_order or openvino_ir.DEFAULT_CHANNEL_ORDER
        return Loaded(
            openvino_ir.contract_model(graph, order).eval(),
            source.stem,
            *openvino_ir.input_size(graph),
            order,
            [source, source.with_suffix(".bin")],
        )
    if channel_order not in (None, "rgb"):
        raise ValueError("torchreid models read RGB")
    model, name = torchreid_osnet.contract_model(source)
    return Loaded(model, name, *(input_size or TORCHREID_INPUT), "rgb", [source])


def import_model(
    source: Path,
    output: Path,
    provenance: Optional[Provenance] = None,
    channel_order: Optional[str] = None,
    real_images: Optional[Path] = None,
    input_size: Optional[Tuple[int, int]] = None,
    preprocessing: Optional[Preprocessing] = None,
) -> Dict:
    """Write ``source`` as a contract ONNX file at ``output``; returns a summary with the parity report. A
    failed check deletes the file and raises ``ExportParityError``. ``input_size``: (height, width) for formats
    whose input size is free (torchreid's default 256x128); an IR's or an ONNX file's is its own."""
    source, output, provenance = Path(source), Path(output), provenance or Provenance()
    loaded = load_source(source, channel_order, input_size, preprocessing)
    record = {
        "format": source_format(source),
        "files": {f.name: sha256_of(f) for f in loaded.files if f.exists()},
        "channel_order": loaded.channel_order,
        **({"preprocessing": vars(preprocessing)} if preprocessing else {}),
        "licence": provenance.licence,
        "url": provenance.url,
        **provenance.notes,
    }
    contract = ModelContract(
        architecture=record["format"],
        backbone=loaded.name,
        training_data=provenance.training_data,
        **contract_shape(loaded.model, loaded.height, loaded.width),
    )
    write_onnx(loaded.model, contract, output, metadata={SOURCE_KEY: json.dumps(record)})
    images = parity_images(loaded.height, loaded.width, real_images)
    try:
        report = check_parity(loaded.model, output, images)
        reference = source_agreement(source, output, images, loaded.channel_order, preprocessing)
    except Exception:
        output.unlink(missing_ok=True)
        raise
    return {
        "output": str(output),
        "bytes": output.stat().st_size,
        "contract": contract.to_metadata(),
        "source": record,
        "parity": report,
        "source_agreement": reference,
    }


def source_agreement(
    source: Path,
    output: Path,
    images: Dict[str, np.ndarray],
    channel_order: str,
    preprocessing: Optional[Preprocessing] = None,
) -> Optional[Dict[str, float]]:
    """Max |difference| between the file's embedding and the source's own (L2-normalised) on each image set,
    the source run by its runtime in fp32: OpenVINO for an IR (None where the ``openvino`` package is not
    installed), ONNX Runtime for an ONNX file; None for a torchreid checkpoint (the parity check is its test).
    A set where the source's own output is not finite has None. Past the embedding bound it raises."""
    run = _source_runner(source, preprocessing or Preprocessing())
    if run is None:
        return None
    session, _ = open_cpu_session(output)
    report = {}
    for name, batch in images.items():
        ours = session.run([OUTPUT_EMBEDDING], {INPUT_IMAGES: batch})[0]
        planar = batch.transpose(0, 3, 1, 2).astype(np.float32)
        planar = planar[:, ::-1] if channel_order == "bgr" else planar
        theirs = np.concatenate(
            [run(np.ascontiguousarray(planar[i : i + 1])).reshape(1, -1) for i in range(len(batch))]
        )
        if not np.isfinite(theirs).all():  # the source itself fails there (0267's MVN in ONNX Runtime): no reference
            report[name] = None
            continue
        theirs /= np.maximum(np.linalg.norm(theirs, axis=1, keepdims=True), 1e-12)
        report[name] = float(np.abs(ours - theirs).max())
        if not report[name] <= EMBEDDING_TOLERANCE:
            raise ExportParityError(
                f"{name}: the imported file's embedding differs from the source's by "
                f"{report[name]:.2e} (bound {EMBEDDING_TOLERANCE})"
            )
    return report


def _source_runner(source: Path, preprocessing: Preprocessing) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """The source's embedding of one planar float image [1, 3, H, W] (pixel values, the source's channel order)."""
    kind = source_format(source)
    if kind == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(source), onnx_graph.quiet_options(), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        mean = np.asarray(preprocessing.mean, np.float32).reshape(1, 3, 1, 1)
        scale = np.asarray(preprocessing.scale, np.float32).reshape(1, 3, 1, 1)
        return lambda planar: session.run(None, {name: (planar - mean) / scale})[0]
    if kind != "openvino_ir":
        return None
    try:
        import openvino
    except ImportError:
        return None
    core = openvino.Core()
    compiled = core.compile_model(core.read_model(str(source)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda planar: compiled(planar)[0]
