"""The ONNX model behind the service: load, check against the contract, predict. The execution provider and
how the model's work is spread over threads are chosen here and nowhere else, and what ONNX Runtime really
uses is reported, never silently assumed."""

import logging
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import onnxruntime as ort

from model_zoo.contract import (
    INPUT_IMAGES,
    OUTPUT_ATTENTION_MAPS,
    OUTPUT_EMBEDDING,
    OUTPUT_FEATURE_MAPS,
    OUTPUT_PAIR_MAPS,
    PRECISION_KEY,
    ContractError,
    ModelContract,
    adaptation_summary,
    check_session,
    precision_of,
    precision_path,
)
from model_zoo.files import sha256_of

log = logging.getLogger(__name__)
TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
REQUIRED = {"cuda": CUDA, "tensorrt": TENSORRT}  # REID_EXECUTION_PROVIDER values that refuse to start without theirs


class ProviderUnavailable(RuntimeError):
    """CUDA or TensorRT was required but ONNX Runtime cannot use it."""


def choose_providers(requested: str) -> List[str]:
    """The provider list to ask ONNX Runtime for: 'auto' prefers CUDA when this build offers it; 'tensorrt'
    puts TensorRT first, CUDA then the CPU behind it for the nodes TensorRT does not take."""
    available = ort.get_available_providers()
    if requested == "cpu":
        return [CPU]
    if requested in REQUIRED and REQUIRED[requested] not in available:
        raise ProviderUnavailable(
            f"REID_EXECUTION_PROVIDER={requested}, but this onnxruntime offers only {available}; install the GPU set"
        )
    if requested == "tensorrt":
        return [TENSORRT, CUDA, CPU]
    return [CUDA, CPU] if CUDA in available else [CPU]


def provider_options(
    providers: Sequence[str], tensorrt_cache: Optional[Path], input_size: Tuple[int, int] = (0, 0), max_batch: int = 1
) -> List[dict]:
    """ONNX Runtime's options per provider. TensorRT: one optimisation profile for batches of 1 to ``max_batch``
    images of ``input_size`` (without it TensorRT builds an engine again for each new batch size it meets), the
    engines (minutes for a model) and the timing cache kept in ``tensorrt_cache`` so a restart loads them, and
    no fp16 flag: an fp32 file stays fp32 (TensorRT's fp16 mode would also round the nodes the contract keeps
    float32); the fp16 file is float16 already."""
    tensorrt = {"trt_engine_cache_enable": "True", "trt_timing_cache_enable": "True"}
    if tensorrt_cache is not None:
        tensorrt.update(trt_engine_cache_path=str(tensorrt_cache), trt_timing_cache_path=str(tensorrt_cache))
    if all(input_size):
        shape = "x".join(map(str, input_size))
        tensorrt.update(
            trt_profile_min_shapes=f"{INPUT_IMAGES}:1x{shape}x3",
            trt_profile_opt_shapes=f"{INPUT_IMAGES}:{max_batch}x{shape}x3",
            trt_profile_max_shapes=f"{INPUT_IMAGES}:{max_batch}x{shape}x3",
        )
    return [tensorrt if provider == TENSORRT else {} for provider in providers]


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cpu_cores(cgroup_cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may use: its CPU affinity (taskset, cpusets), capped by a cgroup v2 CPU quota
    (``docker run --cpus``, Kubernetes limits), rounded up."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()
    except (OSError, ValueError):
        return cores
    return cores if quota == "max" else max(1, min(cores, math.ceil(int(quota) / int(period))))


def plan_threads(provider: str, instances: int, intra_op_threads: int) -> Tuple[int, int]:
    """(model calls at once, ONNX Runtime threads per call); 0 in either argument means choose.

    On the CPU, one single-threaded call per core: on 2 cores two concurrent calls embedded 78.9 images/s
    where one call on both cores embedded 73.6 (bench/results/service.json), because single-threaded calls
    never wait for each other inside an operator, and a request thread that takes a core stalls one call,
    not both. On CUDA, one call at a time with ONNX Runtime's default threads (the GPU does the work)."""
    if provider == CPU:
        instances = instances or cpu_cores()
        return instances, intra_op_threads or max(1, cpu_cores() // instances)
    return instances or 1, intra_op_threads


@dataclass
class ProviderReport:
    requested: str
    asked: List[str]
    active: str  # the provider ONNX Runtime put first after creating the session: the one really running
    instances: int  # model calls that run at once
    intra_op_threads: int  # ONNX Runtime threads per call (0: its default)

    @property
    def fell_back(self) -> bool:
        return self.asked[0] != self.active


@dataclass
class ImageMaps:
    """The maps predict(with_maps=True) returns beside the embedding, for a batch (or, indexed, one image)."""

    features: np.ndarray  # the contract's feature_maps [B, N, D, h, w]
    attention: Optional[np.ndarray] = None  # the optional attention_maps [B, K, h', w'], when the model exports them
    pair: Optional[np.ndarray] = None  # the optional pair_maps [B, C, h, w], when the model exports them

    def __getitem__(self, rows) -> "ImageMaps":
        return ImageMaps(*(None if maps is None else maps[rows] for maps in astuple_shallow(self)))

    @staticmethod
    def concatenate(parts: Sequence["ImageMaps"]) -> "ImageMaps":
        columns = zip(*(astuple_shallow(p) for p in parts))
        return ImageMaps(*(None if column[0] is None else np.concatenate(column) for column in columns))

    @property
    def pair_input(self) -> np.ndarray:
        """A [B, C, h, w] ([C, h, w] for one image), what CASN's pair head reads: ``pair_maps`` when the model
        exports them, else the first branch's feature map (CASN's IDE layout, whose one contract map is A)."""
        return self.features[..., 0, :, :, :] if self.pair is None else self.pair

    @property
    def nbytes(self) -> int:
        return sum(maps.nbytes for maps in astuple_shallow(self) if maps is not None)


def astuple_shallow(maps: ImageMaps) -> tuple:
    """The fields in order, the arrays themselves (dataclasses.astuple would deep-copy them)."""
    return tuple(getattr(maps, f.name) for f in fields(maps))


class InferenceModel:
    """load() once, then predict(uint8 [B, H, W, 3]) -> (embedding [B, N*D], ImageMaps or None).

    ``precision`` (REID_MODEL_PRECISION) picks the file: fp32 loads ``path`` itself, int8 or fp16 the file beside
    it, ``<stem>.int8.onnx`` or ``<stem>.fp16.onnx`` (``python -m training quantize`` / ``fp16`` write them),
    which must say that precision in reid.precision. With TensorRT, ``max_batch`` bounds its optimisation profile.
    ``self.path`` is the file really loaded, whose sha256 is the fingerprint (a gallery re-embeds on a switch),
    and after load() ``self.precision`` is what that file says it is.

    predict may be called from ``instances`` threads at once (ONNX Runtime sessions are safe for that)."""

    def __init__(
        self,
        path: Path,
        provider: str = "auto",
        intra_op_threads: int = 0,
        instances: int = 0,
        precision: str = "fp32",
        tensorrt_cache: Optional[Path] = None,
        max_batch: int = 32,
    ):
        self.precision, self.model_path, self.tensorrt_cache, self.max_batch = (
            precision,
            Path(path),
            tensorrt_cache,
            max_batch,
        )
        self.path = precision_path(path, precision)
        self.requested_provider = provider
        self.intra_op_threads, self.instances = intra_op_threads, instances

    def load(self) -> "InferenceModel":
        if not self.path.is_file():
            if self.path != self.model_path:
                command = "quantize" if self.precision == "int8" else "fp16"
                raise FileNotFoundError(
                    f"REID_MODEL_PRECISION={self.precision} serves {self.path}, which does not "
                    f"exist: write it beside REID_MODEL_PATH with "
                    f"python -m training {command} {self.model_path} --data-root TRAINING_DATA "
                    f"(repeat --data-root for several folders)"
                )
            raise FileNotFoundError(f"model file {self.path} does not exist (REID_MODEL_PATH)")
        asked = choose_providers(self.requested_provider)
        self.instances, self.intra_op_threads = plan_threads(asked[0], self.instances, self.intra_op_threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        input_size = (0, 0)
        if TENSORRT in asked:  # its optimisation profile needs the input size, which the file's metadata holds
            contract = check_session(ort.InferenceSession(str(self.path), providers=[CPU]))
            input_size = (contract.input_height, contract.input_width)
            if self.tensorrt_cache is not None:
                Path(self.tensorrt_cache).mkdir(parents=True, exist_ok=True)
        self.session = ort.InferenceSession(
            str(self.path),
            options,
            providers=asked,
            provider_options=provider_options(asked, self.tensorrt_cache, input_size, self.max_batch),
        )
        self.wide_session = self._wide_session(asked[0], providers=asked)
        self.contract: ModelContract = check_session(self.session)
        metadata = self.session.get_modelmeta().custom_metadata_map
        precision = precision_of(metadata)
        self.adaptation = adaptation_summary(metadata)
        if self.precision != "fp32" and precision != self.precision:
            raise ContractError(
                f"{self.path} says {PRECISION_KEY}={precision}: REID_MODEL_PRECISION={self.precision} "
                f"serves {self.precision} files only"
            )
        self.precision = precision
        self.providers = ProviderReport(
            self.requested_provider, asked, self.session.get_providers()[0], self.instances, self.intra_op_threads
        )
        if self.providers.fell_back:
            message = (
                f"asked ONNX Runtime for {asked[0]} but it runs on {self.providers.active} "
                "(CUDA/cuDNN/TensorRT libraries missing?)"
            )
            if self.requested_provider in REQUIRED:
                raise ProviderUnavailable(message)
            log.warning(message)
        self.fingerprint = sha256_of(self.path)
        outputs = {node.name for node in self.session.get_outputs()}
        # ImageMaps field -> the optional output that fills it, for the outputs this file has
        self.optional_maps = {
            field: name
            for field, name in (("attention", OUTPUT_ATTENTION_MAPS), ("pair", OUTPUT_PAIR_MAPS))
            if name in outputs
        }
        self.has_attention_maps, self.has_pair_maps = "attention" in self.optional_maps, "pair" in self.optional_maps
        return self

    def _wide_session(self, provider: str, **session_args) -> Optional["ort.InferenceSession"]:
        """On the CPU with several single-threaded calls, a second session that runs one call on every thread:
        for a batch that finds the model otherwise idle (a lone query: 18 ms instead of 28 for retail-0277 on
        two cores), while concurrent batches keep the plan that embeds fastest."""
        if provider != CPU or self.instances < 2:
            return None
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.instances * self.intra_op_threads
        # Its idle threads would spin-wait after each call (ONNX Runtime's default), taking the cores from the
        # single-threaded calls and other processes that come next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(self.path), options, **session_args)

    def stop_asking_for(self, field: str) -> None:
        """Leave an optional map (an ImageMaps field) out of predict's outputs from now on, where the file has it
        but nothing reads it: it would cost a copy per image and room in the map cache."""
        self.optional_maps.pop(field, None)

    def output_channels(self, name: str) -> int:
        """Dimension 1 of output ``name`` as the file declares it (the exporter leaves only the batch dynamic)."""
        return next(node.shape[1] for node in self.session.get_outputs() if node.name == name)

    @property
    def input_size(self) -> Tuple[int, int]:
        return self.contract.input_height, self.contract.input_width

    def predict(
        self, images: np.ndarray, with_maps: bool = True, wide: bool = False
    ) -> Tuple[np.ndarray, Optional[ImageMaps]]:
        """The maps only when asked for (they cost memory and time), the optional attention and pair maps with them.
        ``wide``: run on every thread at once (when nothing else is running), where the plan has such a session."""
        session = self.wide_session if wide and self.wide_session is not None else self.session
        if not with_maps:
            return session.run([OUTPUT_EMBEDDING], {INPUT_IMAGES: images})[0], None
        names = [OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS, *self.optional_maps.values()]
        embedding, features, *extra = session.run(names, {INPUT_IMAGES: images})
        return embedding, ImageMaps(features, **dict(zip(self.optional_maps, extra)))
