"""A plain ONNX embedding model (one image input [1 or B, 3, H, W], one embedding output) translated into the
OpenVINO importer's graph (``openvino_ir.IRGraph``: layers with OpenVINO op names), so it runs through the same
trainable torch ops, the same head analysis and the same exact per-cell decomposition as an IR.

What the translation does:
- every tensor's shape comes from one ONNX Runtime pass over a blank image at batch 1 (reshapes take their
  declared output shape with a free batch, as the IR importer's do);
- nodes whose inputs are all constants are folded (ONNX's reference evaluator); nodes that compute shapes from
  the image (``Shape`` and what it feeds) are not translated: a reshape needs no computed shape;
- ``Conv`` (with ``group``), ``BatchNormalization`` and ``InstanceNormalization`` (as a multiply and an add),
  ``Gemm`` (a MatMul and an add), the global poolings and the element-wise ops map one to one.

The input's preprocessing is not in the file: ``mean`` and ``scale`` (pixel units, OpenVINO's ``mean_values``
and ``scale_values``) say what the model expects, and are written into the graph. Any op not listed is refused
by name, never guessed.
"""

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from model_zoo.importers.openvino_ir import IRGraph, Layer, UnsupportedGraph

ELEMENTWISE = {
    "Add": "Add",
    "Sub": "Subtract",
    "Mul": "Multiply",
    "Div": "Divide",
    "Relu": "ReLU",
    "Sigmoid": "Sigmoid",
    "Tanh": "Tanh",
    "PRelu": "PReLU",
    "HardSwish": "HSwish",
    "MatMul": "MatMul",
}
RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
PASS_THROUGH = ("Identity", "Dropout")
AUTO_PAD = {"NOTSET": "explicit", "SAME_UPPER": "same_upper", "SAME_LOWER": "same_lower", "VALID": "valid"}


def _attributes(node: onnx.NodeProto) -> Dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _text(value) -> str:
    """A string attribute (ONNX stores them as bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _joined(values: Sequence[int]) -> str:
    return ",".join(str(int(v)) for v in values)


def quiet_options():
    """ONNX Runtime session options that log errors only (a source's unused initializers are not news)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return options


def _tensor_shapes(model: onnx.ModelProto, height: int, width: int, batch: int) -> Dict[str, List[int]]:
    """Every tensor's shape, read off one ONNX Runtime pass over a blank image."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(probe)
    typed = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    outputs = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in outputs and name in typed:
                probe.graph.output.append(typed[name])
                outputs.add(name)
    session = ort.InferenceSession(probe.SerializeToString(), quiet_options(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    values = session.run(None, {input_name: np.zeros((batch, 3, height, width), np.float32)})
    shapes = {node.name: list(value.shape) for node, value in zip(session.get_outputs(), values)}
    shapes[input_name] = [batch, 3, height, width]
    return shapes


class _Translator:
    def __init__(self, model: onnx.ModelProto, shapes: Dict[str, List[int]]):
        self.model, self.shapes = model, shapes
        self.layers: Dict[str, Layer] = {}
        self.tensors: Dict[str, str] = {}  # ONNX tensor name -> layer id
        self.constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.shape_only = set()  # tensors computed from the image's shape, not its pixels
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

    def add(self, op: str, name: str, inputs: List[str], attrs: Optional[Dict] = None, shape=None, value=None) -> str:
        layer = Layer(str(len(self.layers)), op, name, {k: str(v) for k, v in (attrs or {}).items()})
        layer.inputs = [(source, 0) for source in inputs]
        layer.input_shapes = [self.layers[source].shapes[0] if self.layers[source].shapes else [] for source in inputs]
        layer.shapes = [list(shape)] if shape is not None else [list(np.shape(value))]
        layer.value = value
        self.layers[layer.id] = layer
        return layer.id

    def const(self, value, name: str = "const") -> str:
        return self.add("Const", name, [], value=np.asarray(value))

    def data(self, tensor: str) -> str:
        if tensor in self.tensors:
            return self.tensors[tensor]
        if tensor in self.constants:
            return self.const(self.constants[tensor], tensor)
        raise UnsupportedGraph(f"tensor {tensor!r} is computed from the image's shape but used as data")

    def emit(self, op: str, node: onnx.NodeProto, inputs: List[str], attrs=None) -> str:
        """A layer for ``node``'s first output, shaped as ONNX Runtime saw that tensor; ``_Conv``, ``_Gemm``, ...
        (named after the ONNX op they translate) emit the layers of the ops that are not one to one."""
        layer = self.add(op, node.name or node.output[0], inputs, attrs, shape=self.shapes.get(node.output[0]))
        self.tensors[node.output[0]] = layer
        return layer

    def fold(self, node: onnx.NodeProto) -> bool:
        """Evaluate a node whose inputs are all constants; True where it was."""
        if not all(name in self.constants or not name for name in node.input) or node.op_type == "Shape":
            return False
        from onnx.reference import ReferenceEvaluator

        single = helper.make_model(
            helper.make_graph([node], "fold", [], [helper.make_tensor_value_info(o, 0, None) for o in node.output]),
            opset_imports=self.model.opset_import,
        )
        feeds = {name: self.constants[name] for name in node.input if name}
        for name, value in zip(node.output, ReferenceEvaluator(single).run(None, feeds)):
            self.constants[name] = np.asarray(value)
        return True

    def node(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        if op == "Constant":
            self.constants[node.output[0]] = numpy_helper.to_array(_attributes(node)["value"])
            return
        if self.fold(node):
            return
        if op == "Shape" or all(n in self.shape_only or n in self.constants or not n for n in node.input):
            self.shape_only.update(node.output)
            return
        translate = getattr(self, f"_{op}", None)
        if op in ELEMENTWISE:
            self.emit(ELEMENTWISE[op], node, [self.data(n) for n in node.input])
        elif op in RESHAPES:
            target = self.shapes[node.output[0]]
            self.emit("Reshape", node, [self.data(node.input[0]), self.const(np.array(target, np.int64))])
        elif op in PASS_THROUGH:
            self.tensors[node.output[0]] = self.data(node.input[0])
        elif translate is not None:
            translate(node, _attributes(node))
        else:
            raise UnsupportedGraph(f"ONNX op {op} ({node.name!r}) is not supported")

    def _channel_vector(self, values: np.ndarray, like: str) -> np.ndarray:
        """A per-channel vector shaped to broadcast on ``like`` ([1, C, 1, 1] for a map, [1, C] for a vector)."""
        rank = len(self.shapes[like])
        return values.astype(np.float32).reshape(1, -1, *([1] * (rank - 2)))

    def _Conv(self, node, attrs) -> None:
        weight = self.constants[node.input[1]]
        kernel = weight.shape[2:]
        pads = attrs.get("pads", [0] * 2 * len(kernel))
        settings = {
            "strides": _joined(attrs.get("strides", [1] * len(kernel))),
            "dilations": _joined(attrs.get("dilations", [1] * len(kernel))),
            "pads_begin": _joined(pads[: len(kernel)]),
            "pads_end": _joined(pads[len(kernel) :]),
            "auto_pad": AUTO_PAD[_text(attrs.get("auto_pad", "NOTSET"))],
        }
        groups = attrs.get("group", 1)
        op = "Convolution" if groups == 1 else "GroupConvolution"
        if groups != 1:
            weight = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        has_bias = len(node.input) > 2 and node.input[2]
        convolution = self.emit(op, node, [self.data(node.input[0]), self.const(weight, node.input[1])], settings)
        if has_bias:
            bias = self._channel_vector(self.constants[node.input[2]], node.output[0])
            self.emit("Add", node, [convolution, self.const(bias, node.input[2])])

    def _affine(self, node, source: str, scale: np.ndarray, shift: np.ndarray) -> None:
        scaled = self.emit("Multiply", node, [source, self.const(self._channel_vector(scale, node.output[0]))])
        self.emit("Add", node, [scaled, self.const(self._channel_vector(shift, node.output[0]))])

    def _BatchNormalization(self, node, attrs) -> None:
        gamma, beta, mean, variance = (self.constants[n] for n in node.input[1:5])
        scale = gamma / np.sqrt(variance + attrs.get("epsilon", 1e-5))
        self._affine(node, self.data(node.input[0]), scale, beta - mean * scale)

    def _InstanceNormalization(self, node, attrs) -> None:
        normalised = self.emit(
            "MVN",
            node,
            [self.data(node.input[0]), self.const(np.array([2, 3], np.int64))],
            {"eps": attrs.get("epsilon", 1e-5), "normalize_variance": "true", "eps_mode": "inside_sqrt"},
        )
        self._affine(node, normalised, self.constants[node.input[1]], self.constants[node.input[2]])

    def _MeanVarianceNormalization(self, node, attrs) -> None:
        # Axis 0 is the batch: a re-ID model normalises each image alone (files like Open Model Zoo's 0267 are
        # exported at batch 1, where the two agree), so the batch axis is left out.
        axes = [a for a in attrs.get("axes", [0, 2, 3]) if a % len(self.shapes[node.input[0]]) != 0]
        attributes = {"eps": 1e-9, "normalize_variance": "true", "eps_mode": "inside_sqrt"}
        self.emit("MVN", node, [self.data(node.input[0]), self.const(np.array(axes, np.int64))], attributes)

    def _Gemm(self, node, attrs) -> None:
        if attrs.get("transA", 0):
            raise UnsupportedGraph(f"Gemm {node.name!r} transposes its data input")
        weight = attrs.get("alpha", 1.0) * self.constants[node.input[1]].astype(np.float32)
        product = self.emit(
            "MatMul",
            node,
            [self.data(node.input[0]), self.const(weight, node.input[1])],
            {"transpose_b": "true" if attrs.get("transB", 0) else "false"},
        )
        if len(node.input) > 2 and node.input[2]:
            bias = attrs.get("beta", 1.0) * self.constants[node.input[2]].astype(np.float32)
            self.emit("Add", node, [product, self.const(bias.reshape(1, -1), node.input[2])])

    def _pool(self, node, attrs, op: str) -> None:
        kernel = attrs["kernel_shape"]
        pads = attrs.get("pads", [0] * 2 * len(kernel))
        settings = {
            "kernel": _joined(kernel),
            "strides": _joined(attrs.get("strides", [1] * len(kernel))),
            "pads_begin": _joined(pads[: len(kernel)]),
            "pads_end": _joined(pads[len(kernel) :]),
            "rounding_type": "ceil" if attrs.get("ceil_mode", 0) else "floor",
            "exclude-pad": "false" if attrs.get("count_include_pad", 0) else "true",
        }
        self.emit(op, node, [self.data(node.input[0])], settings)

    def _MaxPool(self, node, attrs) -> None:
        self._pool(node, attrs, "MaxPool")

    def _AveragePool(self, node, attrs) -> None:
        self._pool(node, attrs, "AvgPool")

    def _GlobalAveragePool(self, node, attrs) -> None:
        axes = self.const(np.array([2, 3], np.int64))
        self.emit("ReduceMean", node, [self.data(node.input[0]), axes], {"keep_dims": "true"})

    def _ReduceMean(self, node, attrs) -> None:
        axes = attrs["axes"] if "axes" in attrs else self.constants[node.input[1]]
        keep = "true" if attrs.get("keepdims", 1) else "false"
        self.emit(
            "ReduceMean", node, [self.data(node.input[0]), self.const(np.array(axes, np.int64))], {"keep_dims": keep}
        )

    def _Clip(self, node, attrs) -> None:
        low = attrs.get("min", self.constants.get(node.input[1]) if len(node.input) > 1 and node.input[1] else -np.inf)
        high = attrs.get("max", self.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.inf)
        self.emit("Clamp", node, [self.data(node.input[0])], {"min": float(low), "max": float(high)})

    def _Concat(self, node, attrs) -> None:
        self.emit("Concat", node, [self.data(n) for n in node.input], {"axis": attrs["axis"]})

    def _Transpose(self, node, attrs) -> None:
        self.emit("Transpose", node, [self.data(node.input[0]), self.const(np.array(attrs["perm"], np.int64))])

    def _Softmax(self, node, attrs) -> None:
        self.emit("Softmax", node, [self.data(node.input[0])], {"axis": attrs.get("axis", -1)})

    def _Pad(self, node, attrs) -> None:
        pads = attrs["pads"] if "pads" in attrs else self.constants[node.input[1]]
        mode = _text(attrs.get("mode", "constant"))
        if mode != "constant":
            raise UnsupportedGraph(f"Pad {node.name!r} in mode {mode!r}: only constant padding is supported")
        value = attrs.get(
            "value", self.constants.get(node.input[2], 0.0) if len(node.input) > 2 and node.input[2] else 0.0
        )
        half = len(pads) // 2
        self.emit(
            "Pad",
            node,
            [
                self.data(node.input[0]),
                self.const(np.array(pads[:half], np.int64)),
                self.const(np.array(pads[half:], np.int64)),
            ],
            {"pad_mode": "constant", "pad_value": float(np.asarray(value))},
        )


def read_onnx(path: Path, mean: Sequence[float] = (0.0, 0.0, 0.0), scale: Sequence[float] = (1.0, 1.0, 1.0)) -> IRGraph:
    """``path`` as the IR importer's graph, the preprocessing (x - mean) / scale at its input."""
    model = onnx.load(str(path))
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise UnsupportedGraph(
            f"{Path(path).name}: {len(inputs)} inputs and {len(graph.output)} outputs; "
            "an embedding model has one of each"
        )
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != 3 or not dims[2] or not dims[3]:
        raise UnsupportedGraph(f"input shape {dims}: an image model reads [B, 3, H, W] with a fixed H and W")
    batch = dims[0] or 1
    shapes = _tensor_shapes(model, dims[2], dims[3], batch)
    translator = _Translator(model, shapes)
    image = translator.add("Parameter", inputs[0].name, [], shape=[batch, 3, dims[2], dims[3]])
    centred = translator.add(
        "Subtract",
        "mean",
        [image, translator.const(np.array(mean, np.float32).reshape(1, 3, 1, 1))],
        shape=[batch, 3, dims[2], dims[3]],
    )
    translator.tensors[inputs[0].name] = translator.add(
        "Divide",
        "scale",
        [centred, translator.const(np.array(scale, np.float32).reshape(1, 3, 1, 1))],
        shape=[batch, 3, dims[2], dims[3]],
    )
    for node in graph.node:
        translator.node(node)
    output = translator.data(graph.output[0].name)
    result = translator.add("Result", graph.output[0].name, [output], shape=translator.layers[output].shapes[0])
    return IRGraph(translator.layers, image, result)
