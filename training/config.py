"""Training configuration: dataclasses with help text, YAML files that layer a ``_base_`` file, and
``section.key=value`` overrides from the command line (values parsed as YAML).

The ``model`` and ``loss`` sections hold the keys every architecture and objective share (``SharedModelOptions``,
``SharedLossOptions``) and, beside them, every key an architecture or objective declares next to its own code
(``model_zoo.registry.MODEL_OPTIONS_REGISTRY``, ``training.objectives.base.LOSS_OPTIONS_REGISTRY``), so a new
architecture's options are a new class in its own file. Keys stay flat (``model.clpd_parts``), so configs and
checkpoints written before read unchanged."""

from dataclasses import MISSING, Field, asdict, dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import yaml

from model_zoo.registry import MODEL_OPTIONS_REGISTRY, Registry, option

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class SharedModelOptions:
    architecture: str = option("cama", "architecture name in model_zoo's registry")
    backbone: str = option("mobilenetv2", "backbone: mobilenetv2 or resnet50")
    num_branches: int = option(3, "number of ordered branches N (1 = IDE+BN baseline)")
    reduction_dim: Optional[int] = option(
        None, "optional 1x1 reduction to D channels per branch (null: backbone width)"
    )
    pretrained: Optional[str] = option(
        "imagenet", "'imagenet' (MobileNetV2: fetched offline), a checkpoint path, or null"
    )
    ibn: Union[bool, str] = option(
        False,
        "IBN-Net: false; true or 'a' (IBN-a: half instance / half batch norm in the "
        "early blocks, MobileNetV2 1-10, ResNet-50 layer1-3); 'b' (IBN-b: the stem's "
        "norm an instance norm, and one after the residual sum ending the stride-4 "
        "and stride-8 stages)",
    )
    last_stride: int = option(
        1,
        "stride of the backbone's last stage (layer4): 1 (re-ID's usual, a 16x8 map at "
        "256x128) or 2 (the ImageNet network)",
    )
    bn_neck: bool = option(
        False,
        "FMN, PMM: a batch norm between each branch's (stage's) descriptor and its "
        "classifier in training (the identity loss on BN features, the triplet on the raw "
        "ones, as IDE+BN's head); exported maps unchanged; a deviation from the paper",
    )


@dataclass
class SharedLossOptions:
    objective: Optional[str] = option(
        None, "the registered objective (training/objectives); null: the architecture's own"
    )
    alpha: float = option(1.0, "weight of the overlapped activation penalty (eq. 8); 0 gives MltB+L_id")
    teacher: Optional[str] = option(
        None,
        "distillation: a contract ONNX file (trained here or imported) that embeds "
        "every training batch as well; its terms join the objective's "
        "(training/objectives/distillation.py)",
    )
    kd_feature_weight: float = option(
        1.0, "distillation: weight of 1 - cos(student, teacher) per image (the embeddings must have one size)"
    )
    kd_relation_weight: float = option(
        1.0, "distillation: weight of the squared difference of the in-batch similarity matrices"
    )
    k: int = option(20, "sigma^i is the k-th largest value of M^i_t (eq. 5); the 16x8 grid has 128 cells, 8x4 has 32")
    oap_mode: str = option(
        "symmetric",
        "'symmetric' (eq. 6: the product of all masks) or 'ordered' (branch i against "
        "the fixed union of branches 1..i-1)",
    )
    label_smoothing: float = option(0.0, "label smoothing eps of the identification loss (0: plain cross-entropy)")
    triplet_weight: float = option(
        0.0, "weight of the batch-hard triplet loss on the per-branch features (0: off; use the pk sampler)"
    )
    triplet_margin: Optional[float] = option(0.3, "triplet margin on L2-normalised features (null: soft margin)")


@dataclass
class DataConfig:
    roots: List[str] = option([], "training folders in Market-1501 layout; ids and cameras are offset per folder")
    source_weights: Dict[str, float] = option(
        {}, "per-source sampling multipliers, e.g. {TownCentre: 0.5} (source: a folder's name or a mapping.csv subset)"
    )
    height: int = option(256, "input height")
    width: int = option(128, "input width")
    flip_prob: float = option(0.5, "probability of a horizontal flip")
    padding: int = option(10, "zero padding before the random crop, in pixels")
    crop_area: List[float] = option(
        [],
        "[low, high]: a random-sized crop of this share of the image's area, resized "
        "back, instead of padding and cropping ([]: off)",
    )
    crop_aspect: List[float] = option(
        [1 / 3, 1 / 2], "[low, high]: the random-sized crop's width / height, drawn log-uniformly"
    )
    color_jitter: float = option(
        0.0, "colour jitter strength s: brightness, contrast, saturation factors in [1-s, 1+s] (0: off)"
    )
    color_jitter_prob: float = option(0.8, "probability that an image is colour-jittered")
    grayscale_prob: float = option(0.0, "probability of turning an image to grayscale")
    erasing_prob: float = option(0.0, "probability of random erasing (area 2-40%, random pixels)")
    sampler: str = option(
        "random",
        "'random', 'pk' (P identities x K images per batch) or 'pairs' (batch_size / 2 "
        "image pairs, for Siamese training)",
    )
    pair_positive_share: float = option(0.5, "pairs sampler: the share of pairs showing one person twice")
    batch_size: int = option(32, "images per batch")
    num_instances: int = option(4, "K, images per identity, for the pk sampler")
    cache_images: bool = option(True, "decode and resize every training image once, into memory")
    workers: int = option(0, "processes that decode images and make augmented batches ahead of the model (0: inline)")


@dataclass
class SolverConfig:
    optimizer: str = option("adam", "'adam' or 'sgd' (with momentum)")
    lr: float = option(3e-4, "learning rate after the warm-up")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(False, "SGD with Nesterov momentum")
    weight_decay: float = option(5e-4, "weight decay")
    warmup_lr: float = option(3e-6, "learning rate at the start of the warm-up")
    warmup_epochs: int = option(10, "epochs training only the classifiers W^i, lr rising warmup_lr -> lr")
    epochs: int = option(50, "epochs training the whole model after the warm-up")
    scheduler: str = option(
        "step",
        "after the warm-up: 'step' (x gamma every step_size epochs), 'multistep' (x gamma "
        "at each milestone), 'cosine' (down to lr x final_lr_factor) or 'constant'",
    )
    step_size: int = option(20, "multiply the lr by gamma every step_size epochs after the warm-up")
    milestones: List[int] = option([], "multistep: epochs after the warm-up at which the lr is multiplied by gamma")
    gamma: float = option(0.1, "lr decay factor")
    final_lr_factor: float = option(0.01, "the cosine schedule's last learning rate, as a fraction of lr")
    phases: List[Dict[str, Any]] = option(
        [],
        "explicit training phases (training/solver.py: name, epochs, trainable, "
        "eval_mode, optimizer, lr, lr_multipliers, fixed_lr, scheduler, "
        "start_lr, step_size, milestones, gamma, loss_weights, "
        "max_iters_per_epoch ...); when given, the warm-up/epochs/scheduler keys "
        "above are not used, and each phase takes optimizer, lr, momentum, "
        "nesterov and weight_decay from above unless it sets them",
    )
    max_iters_per_epoch: Optional[int] = option(None, "cap on iterations per epoch (smoke tests)")


@dataclass
class RunConfig:
    output_dir: str = option("runs/default", "run folder: config, checkpoints, metrics")
    seed: int = option(0, "random seed")
    device: str = option("auto", "'auto' (CUDA when present), 'cuda' or 'cpu'")
    amp: bool = option(
        True,
        "mixed precision: fp16 autocast on CUDA; bf16 autocast on CPUs with native bf16 "
        "(AVX512-BF16, AMX), unless a layer checked at the start computes wrongly in bf16 there "
        "(then fp32, with a warning); else off",
    )
    force_cpu_bf16: bool = option(
        False,
        "with amp: bf16 autocast on any CPU, emulated where it lacks native bf16 "
        "(slower, the same autocast and bf16 rounding): to measure bf16's accuracy on "
        "such a CPU",
    )
    channels_last: bool = option(False, "channels-last memory format for the convolutions")
    zero_subnormals_every: int = option(
        50,
        "on a CPU, zero the weights, batch-norm statistics and optimiser state "
        "below float32's smallest normal number every this many steps (0: never): "
        "x86 CPUs compute with such values in microcode, and a late checkpoint "
        "trained 1.4-1.8x faster with them zeroed",
    )
    threads: Optional[int] = option(None, "torch CPU threads (null: torch's default)")
    checkpoint_every: int = option(1, "save a checkpoint every this many epochs")
    checkpoint_every_iters: int = option(
        0,
        "also save last.pt every this many batches inside an epoch (0: never), so "
        "that an interrupted run resumes part way through its epoch",
    )
    eval_roots: List[str] = option(
        [],
        "Market-layout folders evaluated (query vs bounding_box_test); empty: the "
        "training roots that have a query split",
    )
    eval_every: int = option(
        0, "also evaluate every this many epochs (0: only at the end); for watching, never for choosing"
    )
    evaluate_at_end: bool = option(True, "evaluate on eval_roots after training")
    progress: bool = option(True, "show a progress bar")


def _copy(spec: Field) -> Field:
    """A fresh field like ``spec`` (a dataclass takes ownership of the fields it is made from)."""
    if spec.default_factory is not MISSING:
        return field(default_factory=spec.default_factory, metadata=spec.metadata)
    return field(default=spec.default, metadata=spec.metadata)


_COMPOSED: Dict[tuple, type] = {}


def compose_section(name: str, shared: type, registry: Registry) -> type:
    """One dataclass with ``shared``'s keys and those of every option class in ``registry`` (made again when a
    class has been registered since; a key declared twice is an error)."""
    parts = [shared, *(options for _, options in registry.items())]
    key = (name, *parts)
    if key not in _COMPOSED:
        owners: Dict[str, str] = {}
        specs = []
        for part in parts:
            for spec in fields(part):
                if spec.name in owners:
                    raise TypeError(f"config key {spec.name!r} declared by {owners[spec.name]} and {part.__name__}")
                owners[spec.name] = part.__name__
                specs.append((spec.name, spec.type, _copy(spec)))
        _COMPOSED[key] = make_dataclass(name, specs)
    return _COMPOSED[key]


def _registered() -> None:
    """Import what registers option classes: every architecture, every objective."""
    import model_zoo.architectures  # noqa: F401
    import training.objectives  # noqa: F401


def model_options() -> type:
    """The ``model`` section's class: shared keys and every architecture's."""
    _registered()
    return compose_section("ModelConfig", SharedModelOptions, MODEL_OPTIONS_REGISTRY)


def loss_options() -> type:
    """The ``loss`` section's class: shared keys and every objective's."""
    _registered()
    from training.objectives.base import LOSS_OPTIONS_REGISTRY

    return compose_section("LossConfig", SharedLossOptions, LOSS_OPTIONS_REGISTRY)


def section(cls: Callable[[], type]):
    """A config section whose class is ``cls()`` (read when a config is made, so late registrations count)."""
    return field(default_factory=lambda: cls()(), metadata={"section": cls})


@dataclass
class TrainConfig:
    model: Any = section(model_options)
    loss: Any = section(loss_options)
    data: DataConfig = section(lambda: DataConfig)
    solver: SolverConfig = section(lambda: SolverConfig)
    run: RunConfig = section(lambda: RunConfig)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def portable_dict(self) -> Dict[str, Any]:
        """``to_dict`` with every absolute path cut to its last part (``/data/x/cuhk03-detected`` ->
        ``cuhk03-detected``): what a file that leaves this machine (an exported model) records of the config."""
        return _without_paths(self.to_dict())


def _without_paths(value):
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    return Path(value).name if isinstance(value, str) and value.startswith("/") else value


def _merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """Sections merge key by key; a key's value is replaced whole, even a list or a mapping such as
    ``data.source_weights`` (so a layer or an override can also empty it)."""
    merged = {section: dict(values) for section, values in base.items()}
    for section, values in update.items():
        merged[section] = {**merged.get(section, {}), **values} if isinstance(values, dict) else values
    return merged


def read_yaml_layers(path: Path) -> Dict[str, Any]:
    """Read a YAML config, first reading the file its ``_base_`` key names (relative to it)."""
    path = Path(path)
    if not path.exists() and (CONFIG_DIR / path).exists():
        path = CONFIG_DIR / path
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("_base_", None)
    return _merge(read_yaml_layers(path.parent / base), data) if base else data


def parse_overrides(overrides: List[str]) -> Dict[str, Any]:
    tree: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not section.key=value")
        dotted, raw = item.split("=", 1)
        *parents, leaf = dotted.split(".")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(raw)
    return tree


def _section_class(spec: Field) -> Optional[type]:
    """The dataclass a field holds, for fields that are config sections."""
    if "section" in spec.metadata:
        return spec.metadata["section"]()
    return spec.default_factory if is_dataclass(spec.default_factory) else None


def from_dict(cls, data: Dict[str, Any]):
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown config keys for {cls.__name__}: {sorted(unknown)}; known: {sorted(known)}")
    values = {}
    for name, value in data.items():
        kind = _section_class(known[name])
        values[name] = from_dict(kind, value) if kind is not None else value
    return cls(**values)


def load_config(path: Optional[Path] = None, overrides: Optional[List[str]] = None) -> TrainConfig:
    data = read_yaml_layers(path) if path else {}
    return from_dict(TrainConfig, _merge(data, parse_overrides(overrides or [])))


def describe_options() -> str:
    """Every config key with its default and help, for the CLI's --help."""
    lines = []
    for spec in fields(TrainConfig):
        kind = _section_class(spec)
        for item in fields(kind):
            default = getattr(kind(), item.name)
            lines.append(f"  {spec.name}.{item.name}={default!r}\n      {item.metadata['help']}")
    return "\n".join(lines)
