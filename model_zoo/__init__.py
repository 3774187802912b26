"""Model zoo: re-ID architectures, their backbones and registry, the ONNX contract, RAM, shipped models.

What this package owns:
- ``contract``: the ONNX contract between training and the service (input, outputs, metadata), torch-free.
- ``ram``: Ranking Activation Maps (CAMA paper, eq. 10) in numpy, torch-free.
- ``rerank``: k-reciprocal re-ranking (Zhong et al., CVPR 2017) in numpy, torch-free, for evaluation and service.
- ``pair_attention``: CASN's pairwise attention term at test time and its pair-head artifact, numpy, torch-free.
- ``preprocess``: image decoding and resizing shared by training and the service, torch-free.
- ``registry``: architectures by name; ``backbones`` and ``architectures`` (with ``contract_maps``): the torch modules.
- ``onnx_export``: the writer of contract files and its ONNX Runtime-against-torch parity check (torch, onnx).
- ``importers``: public models (OpenVINO IR, torchreid OSNet) as contract files, ``python -m model_zoo import`` (torch).
- ``ensemble``: several contract files as one file of their branches, ``python -m model_zoo ensemble``, torch-free.
- ``models/``: the ONNX models that ship with the product, each with a model card, and the source IR of the
  default's first member.
- ``provenance``: where a result came from (commit, command, date, machine, data), torch-free: benchmarks and
  training runs record it in their result files.

Import rules: this package never imports ``service`` or ``training``. Importing ``model_zoo`` itself must not
import torch, so the service can use the torch-free modules; import ``model_zoo.architectures`` (which
imports torch and registers every architecture) where torch is wanted.
"""

from pathlib import Path

SHIPPED_MODELS_DIR = Path(__file__).parent / "models"
# Intel's Open Model Zoo person-reidentification-retail-0277, -0286 and -0287 (Apache-2.0), imported and written
# as one file of three branches (``ensemble``): ahead of retail-0277, the most accurate single model, on all three
# validation sets, at about half its CPU images/s (its card; bench/results/model_candidates.json).
DEFAULT_MODEL_PATH = SHIPPED_MODELS_DIR / "person_reidentification_retail_0277_0286_0287.onnx"
# The default's first member's source, Intel's retail-0277 IR as published (the default's reid.source names both
# files' sha256): the trainable network that `python -m training adapt --model` adapts whole on a user's cameras.
DEFAULT_SOURCE_IR = SHIPPED_MODELS_DIR / "person-reidentification-retail-0277-FP16.xml"
