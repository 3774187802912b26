"""Training: trains re-ID models from ``model_zoo``'s registry on Market-1501-layout data, evaluates them with
the single-query Market protocol, and exports the ONNX file the service loads.

One idea per module, as in reid-strong-baseline: ``data/`` (reader, augmentation, samplers, loader),
``losses``, ``objectives/`` (each architecture's loss terms, by name), ``solver`` (phases, optimisers,
schedules), ``gradcam``, ``engine`` (the loop), ``evaluation``, ``export``, ``quantize`` (the int8 file),
``half_precision`` (the fp16 file), ``calibration`` (the same-person threshold), ``config`` and ``cli``.

Python API first (``training.train``, ``training.evaluate``, ``training.export``, ``training.quantize``);
``python -m training`` is a thin CLI over it. May import torch and ``model_zoo``; never imports ``service``.
"""

from training.config import TrainConfig, load_config
from training.engine import train
from training.evaluation import evaluate_checkpoint as evaluate
from training.export import export_onnx as export
from training.quantize import quantize_model as quantize

__all__ = ["TrainConfig", "load_config", "train", "evaluate", "export", "quantize"]
