"""The ONNX model behind the service: load, check against the contract, predict. The execution provider is
chosen here and nowhere else, and what ONNX Runtime really uses is reported, never silently assumed."""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
import onnxruntime as ort

from model_zoo.contract import INPUT_IMAGES, OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS, ModelContract, check_session
from model_zoo.files import sha256_of

log = logging.getLogger(__name__)
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ProviderUnavailable(RuntimeError):
    """CUDA was required but ONNX Runtime cannot use it."""


def choose_providers(requested: str) -> List[str]:
    """The provider list to ask ONNX Runtime for: 'auto' prefers CUDA when this build offers it."""
    available = ort.get_available_providers()
    if requested == "cpu":
        return [CPU]
    if requested == "cuda" and CUDA not in available:
        raise ProviderUnavailable(f"REID_EXECUTION_PROVIDER=cuda, but this onnxruntime offers only {available}; install the GPU set")
    return [CUDA, CPU] if CUDA in available else [CPU]


@dataclass
class ProviderReport:
    requested: str
    asked: List[str]
    active: str  # the provider ONNX Runtime put first after creating the session: the one really running

    @property
    def fell_back(self) -> bool:
        return self.asked[0] != self.active


class InferenceModel:
    """load() once, then predict(uint8 [B, H, W, 3]) -> (embedding [B, N*D], feature_maps [B, N, D, h, w])."""

    def __init__(self, path: Path, provider: str = "auto", intra_op_threads: int = 0):
        self.path = Path(path)
        self.requested_provider = provider
        self.intra_op_threads = intra_op_threads

    def load(self) -> "InferenceModel":
        if not self.path.is_file():
            raise FileNotFoundError(f"model file {self.path} does not exist (REID_MODEL_PATH)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        asked = choose_providers(self.requested_provider)
        self.session = ort.InferenceSession(str(self.path), options, providers=asked)
        self.contract: ModelContract = check_session(self.session)
        self.providers = ProviderReport(self.requested_provider, asked, self.session.get_providers()[0])
        if self.providers.fell_back:
            message = f"asked ONNX Runtime for {asked[0]} but it runs on {self.providers.active} (CUDA/cuDNN libraries missing?)"
            if self.requested_provider == "cuda":
                raise ProviderUnavailable(message)
            log.warning(message)
        self.fingerprint = sha256_of(self.path)
        return self

    @property
    def input_size(self) -> Tuple[int, int]:
        return self.contract.input_height, self.contract.input_width

    def predict(self, images: np.ndarray, with_maps: bool = True) -> Tuple[np.ndarray, np.ndarray | None]:
        outputs = [OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS] if with_maps else [OUTPUT_EMBEDDING]
        result = self.session.run(outputs, {INPUT_IMAGES: images})
        return result[0], (result[1] if with_maps else None)
