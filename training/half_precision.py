"""float16 export for GPU hosts: ``MODEL.onnx`` -> ``MODEL.fp16.onnx`` beside it, which the service loads with
REID_MODEL_PRECISION=fp16 (contract: model_zoo/CONTRACT.md, "The int8 and fp16 files").

ONNX Runtime's float16 converter (``onnxruntime.transformers.float16``) turns the weights and the arithmetic
to float16, where a GPU's tensor cores run it; the input stays uint8 pixels and the outputs float32
(``keep_io_types``), so nothing outside the file changes. Two things are added, for the contract:
- The nodes that assemble ``embedding`` and ``feature_maps`` stay float32 (the same set the int8 file keeps
  float, ``training.quantize.float_nodes``), so both outputs are float32 functions of the same branch maps and
  the embedding stays exactly the concatenation of the L2-normalised means of the maps (RAM's identity).
- The converter puts a float16 round trip (a Cast to float16 straight back to float32) between two float32
  nodes; those are removed (``drop_round_trips``): with them the identity was off by 1.5e-4 on the shipped
  model, past the exporter's 1e-4 bound; without them 1.5e-7. The converter also appends its Casts at the
  end of the node list; the graph is sorted again, as ONNX (and TensorRT's parser) require.

The file is checked before it is written, as the int8 file is: the contract, the identity on random images
and on held-out training images, and its agreement with the fp32 file there (mean retrieval score of each
image's two embeddings; 0.99995 on the shipped model). On a CPU, ONNX Runtime runs it about as fast as the
fp32 file (it computes most float16 operators in float32): its speed is a GPU's to measure.
"""

import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto

from model_zoo.contract import precision_path
from model_zoo.files import sha256_of
from model_zoo.preprocess import load_for_model
from training.quantize import DEFAULT_AGREEMENT_IMAGES, calibration_files, check_and_write, float_nodes, open_fp32


def casts_to(node: onnx.NodeProto, elem_type: int) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == elem_type for a in node.attribute)


def drop_round_trips(model: onnx.ModelProto) -> int:
    """Cast(float32) of a Cast(float16) of a float32 tensor becomes an Identity of that tensor, and Casts no
    one reads any more are removed; returns how many round trips were dropped."""
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.input, *inferred.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    producer = {output: node for node in graph.node for output in node.output}
    dropped = 0
    for node in graph.node:
        inner = producer.get(node.input[0]) if casts_to(node, TensorProto.FLOAT) else None
        if (
            inner is not None
            and casts_to(inner, TensorProto.FLOAT16)
            and types.get(inner.input[0]) == TensorProto.FLOAT
        ):
            node.op_type, node.input[0] = "Identity", inner.input[0]
            del node.attribute[:]
            dropped += 1
    remove_unread(graph)
    return dropped


def remove_unread(graph: onnx.GraphProto) -> None:
    """Remove the nodes none of whose outputs is read (by a node or as a graph output), until none is left."""
    while True:
        read = {tensor for node in graph.node for tensor in node.input} | {output.name for output in graph.output}
        unread = [node for node in graph.node if not read.intersection(node.output)]
        if not unread:
            return
        for node in unread:
            graph.node.remove(node)


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder the nodes so that each comes after the producers of its inputs."""
    available = {tensor.name for tensor in (*graph.input, *graph.initializer)} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [node for node in pending if available.issuperset(node.input)]
        if not ready:
            raise ValueError("the graph has a cycle")
        for node in ready:
            available.update(node.output)
        ordered += ready
        done = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in done]
    del graph.node[:]
    graph.node.extend(ordered)


def half_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float16 graph of an fp32 model, the contract's nodes kept float32 (module docstring)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(model, keep_io_types=True, node_block_list=sorted(float_nodes(model.graph)))
    drop_round_trips(half)
    sort_topologically(half.graph)
    onnx.checker.check_model(half)
    return half


def convert_to_fp16(
    model: Path,
    data_roots: Sequence[Path],
    output: Optional[Path] = None,
    agreement_images: int = DEFAULT_AGREEMENT_IMAGES,
    seed: int = 0,
) -> Dict:
    """Write the fp16 file of the fp32 ``model`` (default ``MODEL.fp16.onnx`` beside it) and return a summary:
    the file, its size, the agreement with the fp32 file on ``agreement_images`` training images drawn from
    ``data_roots``' ``bounding_box_train`` folders (never an evaluation set), and the identity checks. Every
    ``reid.*`` key of the fp32 file is copied, with ``reid.precision`` = fp16 and ``reid.quantization`` added."""
    from onnxruntime import __version__ as ort_version

    model = Path(model)
    output = Path(output) if output else precision_path(model, "fp16")
    started = time.perf_counter()
    fp32, contract, fp32_metadata = open_fp32(model, output, "fp16")
    held_out = np.stack(
        [
            load_for_model(path, contract.input_height, contract.input_width)
            for path in calibration_files(data_roots, agreement_images, seed)
        ]
    )
    proto = half_graph(onnx.load(str(model)))
    details = {
        "format": "float16",
        "kept_float32": "the nodes assembling embedding and feature_maps",
        "input": "uint8",
        "outputs": "float32",
        "agreement_data": " + ".join(f"{Path(root).name}/bounding_box_train" for root in data_roots),
        "seed": seed,
        "onnxruntime": ort_version,
        "fp32_file": model.name,
        "fp32_sha256": sha256_of(model),
    }
    identity = check_and_write(proto, fp32, fp32_metadata, "fp16", details, held_out, output)
    return {
        "output": str(output),
        "bytes": output.stat().st_size,
        "fp32_bytes": model.stat().st_size,
        "fp16": details,
        "identity": identity,
        "seconds": round(time.perf_counter() - started, 1),
    }
