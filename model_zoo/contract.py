"""The ONNX contract between ``training`` (which writes the file) and ``service`` (which loads it).

The contract itself is written down once, in ``model_zoo/CONTRACT.md``; this module is its executable form:
the names, the metadata keys, and ``check_session`` which both the exporter's parity check and the service
run against a loaded ONNX Runtime session. Torch-free.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

CONTRACT_VERSION = "1.1"
READABLE_CONTRACT_VERSIONS = ("1", "1.1")  # 1.1 only adds optional keys: a version 1 file reads with their defaults
INPUT_IMAGES = "images"
OUTPUT_EMBEDDING = "embedding"
OUTPUT_FEATURE_MAPS = "feature_maps"
OUTPUT_ATTENTION_MAPS = "attention_maps"  # optional: [B, K, h', w'] maps in [0, 1] to show beside RAM (CLPD's parts)
OUTPUT_PAIR_MAPS = "pair_maps"  # optional: [B, C, h, w] the backbone map A that CASN's pair head reads (stripe layout)
OPTIONAL_OUTPUTS = (OUTPUT_ATTENTION_MAPS, OUTPUT_PAIR_MAPS)
METADATA_PREFIX = "reid."
VERIFICATION_KEY = (
    METADATA_PREFIX + "verification"
)  # written by ``python -m training calibrate`` (training/calibration.py)
FEATURE_MAPS_KINDS = ("activations", "attribution")
# Optional keys outside ModelContract, written by ``python -m training quantize`` and ``fp16`` only (an fp32 file lacks
# them):
PRECISION_KEY = METADATA_PREFIX + "precision"  # "int8" or "fp16"; absent: "fp32"
QUANTIZATION_KEY = (
    METADATA_PREFIX + "quantization"
)  # JSON: how the int8 or fp16 file was made (calibration images, source, ...)
PRECISIONS = ("fp32", "int8", "fp16")
SOURCE_KEY = (
    METADATA_PREFIX + "source"
)  # JSON, files written by ``python -m model_zoo import``: format, file sha256s, licence, address
ADAPTATION_KEY = METADATA_PREFIX + "adaptation"  # JSON, files written by ``python -m training adapt``
FLIP_KEY = (
    METADATA_PREFIX + "test_time_flip"
)  # "true": the graph averages each image with its mirror (python -m training export --flip)


class ContractError(ValueError):
    """An ONNX model does not follow the contract."""


@dataclass(frozen=True)
class ModelContract:
    """What a re-ID ONNX model promises: its shapes, and where it came from."""

    architecture: str
    backbone: str
    num_branches: int
    branch_dim: int
    map_height: int
    map_width: int
    input_height: int
    input_width: int
    training_data: str = ""
    evaluation: Dict[str, Any] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    feature_maps_kind: str = "activations"
    verification: Dict[str, Any] = field(
        default_factory=dict
    )  # the same-person threshold and its ROC; {}: not calibrated
    contract_version: str = CONTRACT_VERSION

    def __post_init__(self):
        if self.feature_maps_kind not in FEATURE_MAPS_KINDS:
            raise ContractError(
                f"feature_maps_kind {self.feature_maps_kind!r}, the contract knows {', '.join(FEATURE_MAPS_KINDS)}"
            )

    @property
    def embedding_dim(self) -> int:
        return self.num_branches * self.branch_dim

    def to_metadata(self) -> Dict[str, str]:
        return {METADATA_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, metadata: Dict[str, str]) -> "ModelContract":
        values = {k[len(METADATA_PREFIX) :]: v for k, v in metadata.items() if k.startswith(METADATA_PREFIX)}
        if values.get("contract_version") not in READABLE_CONTRACT_VERSIONS:
            raise ContractError(
                f"model contract version {values.get('contract_version')!r}, "
                f"this code reads {', '.join(READABLE_CONTRACT_VERSIONS)}"
            )
        text_fields = {"architecture", "backbone", "training_data", "feature_maps_kind", "contract_version"}
        try:
            parsed = {
                k: v if k in text_fields else json.loads(v) for k, v in values.items() if k in cls.__dataclass_fields__
            }
            return cls(**parsed)
        except (TypeError, ValueError) as exc:
            raise ContractError(f"model metadata does not follow the contract: {exc}") from None


def _check_io(node, name: str, dtype: str, shape: list) -> None:
    if node.type != dtype:
        raise ContractError(f"{name}: type {node.type}, the contract says {dtype}")
    fixed = [d if isinstance(d, int) else None for d in node.shape]
    if len(fixed) != len(shape) or any(s is not None and f is not None and f != s for f, s in zip(fixed, shape)):
        raise ContractError(f"{name}: shape {node.shape}, the contract says {shape} (None = any)")


def check_session(session) -> ModelContract:
    """Read the contract from an ``onnxruntime.InferenceSession`` and check its inputs and outputs against it."""
    contract = ModelContract.from_metadata(session.get_modelmeta().custom_metadata_map)
    inputs = {node.name: node for node in session.get_inputs()}
    outputs = {node.name: node for node in session.get_outputs()}
    if set(inputs) != {INPUT_IMAGES}:
        raise ContractError(f"inputs {sorted(inputs)}, the contract says [{INPUT_IMAGES!r}]")
    missing = {OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS} - set(outputs)
    if missing:
        raise ContractError(f"outputs {sorted(outputs)} lack {sorted(missing)}")
    c = contract
    _check_io(inputs[INPUT_IMAGES], INPUT_IMAGES, "tensor(uint8)", [None, c.input_height, c.input_width, 3])
    _check_io(outputs[OUTPUT_EMBEDDING], OUTPUT_EMBEDDING, "tensor(float)", [None, c.embedding_dim])
    _check_io(
        outputs[OUTPUT_FEATURE_MAPS],
        OUTPUT_FEATURE_MAPS,
        "tensor(float)",
        [None, c.num_branches, c.branch_dim, c.map_height, c.map_width],
    )
    if OUTPUT_ATTENTION_MAPS in outputs:
        _check_io(outputs[OUTPUT_ATTENTION_MAPS], OUTPUT_ATTENTION_MAPS, "tensor(float)", [None, None, None, None])
    return contract


def open_cpu_session(model: Union[str, Path, bytes]) -> Tuple[Any, ModelContract]:
    """An ONNX Runtime CPU session on a model (a file, or its bytes) and its checked contract: how evaluation,
    export and the training tools read an exported model (the service picks its provider: service.inference)."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"]
    )
    return session, check_session(session)


def split_branches(embedding: np.ndarray, num_branches: int) -> np.ndarray:
    """[..., N*D] -> [..., N, D]: the per-branch L2-normalised features inside an embedding."""
    return embedding.reshape(*embedding.shape[:-1], num_branches, -1)


def identity_error(embedding: np.ndarray, feature_maps: np.ndarray) -> float:
    """Max |normalize(mean over (x, y) of feature_maps[b, i]) - embedding[b, i*D:(i+1)*D]| of one call's two
    outputs: the identity RAM depends on, 0 up to rounding in a file that follows the contract."""
    means = feature_maps.astype(np.float32).mean(axis=(3, 4))
    branches = means / np.maximum(np.linalg.norm(means, axis=2, keepdims=True), 1e-12)
    return float(np.abs(branches - split_branches(embedding, feature_maps.shape[1])).max())


def adaptation_summary(metadata: Dict[str, str]) -> Optional[Dict[str, Any]]:
    """What the file's ``reid.adaptation`` says in brief: its source and what it adapted on; None where the
    file was not adapted (or the record is unreadable, which the contract leaves optional)."""
    try:
        record = json.loads(metadata.get(ADAPTATION_KEY, "null"))
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    return {key: record.get(key) for key in ("source_model", "source_sha256", "crops", "crops_source", "cameras")}


def precision_of(metadata: Dict[str, str]) -> str:
    """The file's ``reid.precision``: "int8" or "fp16" for a converted file, "fp32" where the key is absent."""
    precision = metadata.get(PRECISION_KEY, "fp32")
    if precision not in PRECISIONS:
        raise ContractError(f"{PRECISION_KEY} {precision!r}, the contract knows {', '.join(PRECISIONS)}")
    return precision


def precision_path(model_path: Union[str, Path], precision: str) -> Path:
    """Where a model's file of this precision lives: the fp32 file itself, or beside it, ``model.onnx`` ->
    ``model.int8.onnx`` / ``model.fp16.onnx``."""
    model_path = Path(model_path)
    return model_path if precision == "fp32" else model_path.with_name(f"{model_path.stem}.{precision}.onnx")
