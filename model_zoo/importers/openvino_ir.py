"""OpenVINO IR (``.xml`` + ``.bin``) read into a trainable torch module, without OpenVINO installed.

The XML lists layers (an op type, attributes, typed ports) and edges; constants are byte ranges of the
``.bin``. ``read_ir`` parses both; ``IRNetwork`` runs the layers in topological order with torch ops, every
float constant an ``nn.Parameter`` (so the graph can be fine-tuned), every integer constant (axes, indices)
a fixed value. Only the layers an output depends on through data are run: the shape arithmetic that feeds a
``Reshape`` (``ShapeOf``, ``Gather``, ``Concat`` on shapes) is skipped, the declared output shape with a
free batch taking its place. The ops are those of opset1..8 that re-ID networks use; any other is refused
by name, never guessed.
"""

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ELEMENT_TYPES = {
    "f32": np.float32,
    "f16": np.float16,
    "f64": np.float64,
    "i64": np.int64,
    "i32": np.int32,
    "i8": np.int8,
    "u8": np.uint8,
    "u64": np.uint64,
    "u32": np.uint32,
    "boolean": np.bool_,
}


class UnsupportedGraph(ValueError):
    """The graph holds an op or a layout this importer does not translate."""


@dataclass
class Layer:
    """One IR layer: ``inputs`` are (source layer id, its output index) in port order; ``shapes`` the declared
    shapes of its outputs; ``value`` the array of a Const (or of a Convert folded onto one)."""

    id: str
    type: str
    name: str
    attrs: Dict[str, str]
    inputs: List[Tuple[str, int]] = field(default_factory=list)
    input_shapes: List[List[int]] = field(default_factory=list)
    shapes: List[List[int]] = field(default_factory=list)
    value: Optional[np.ndarray] = None

    def ints(self, key: str) -> List[int]:
        return [int(v) for v in self.attrs[key].split(",")] if self.attrs.get(key, "").strip() else []


# The channel order an IR reads unless told otherwise: OpenVINO's convention, and Open Model Zoo's IRs'. An IR
# does not say reliably (its conversion parameters are optional and name no channel order for a BGR source).
DEFAULT_CHANNEL_ORDER = "bgr"


@dataclass
class IRGraph:
    layers: Dict[str, Layer]
    parameter: str  # the one input layer
    result: str  # the one output layer


def _dims(port) -> List[int]:
    return [int(dim.text) for dim in port.iter("dim")]


def read_ir(xml_path: Path) -> IRGraph:
    """Parse ``xml_path`` and the ``.bin`` beside it; Convert layers on constants are folded into them."""
    xml_path = Path(xml_path)
    root = ElementTree.parse(xml_path).getroot()
    weights = xml_path.with_suffix(".bin").read_bytes() if xml_path.with_suffix(".bin").exists() else b""
    layers, input_ports, output_ports = {}, {}, {}
    for node in root.iter("layer"):
        data = node.find("data")
        layer = Layer(
            node.get("id"), node.get("type"), node.get("name", ""), dict(data.attrib) if data is not None else {}
        )
        ports_in = [] if node.find("input") is None else list(node.find("input").iter("port"))
        ports_out = [] if node.find("output") is None else list(node.find("output").iter("port"))
        input_ports[layer.id] = {port.get("id"): i for i, port in enumerate(ports_in)}
        output_ports[layer.id] = {port.get("id"): i for i, port in enumerate(ports_out)}
        layer.input_shapes = [_dims(port) for port in ports_in]
        layer.shapes = [_dims(port) for port in ports_out]
        layer.inputs = [None] * len(ports_in)
        if layer.type == "Const":
            layer.value = _constant(layer, weights)
        layers[layer.id] = layer
    for edge in root.find("edges").iter("edge"):
        target, source = edge.get("to-layer"), edge.get("from-layer")
        layers[target].inputs[input_ports[target][edge.get("to-port")]] = (
            source,
            output_ports[source][edge.get("from-port")],
        )
    for layer in layers.values():  # IR lists layers in topological order, so a chain of Converts folds front to back
        if layer.type == "Convert" and layers[layer.inputs[0][0]].value is not None:
            layer.value = layers[layer.inputs[0][0]].value.astype(ELEMENT_TYPES[layer.attrs["destination_type"]])
    parameters = [layer.id for layer in layers.values() if layer.type == "Parameter"]
    results = [layer.id for layer in layers.values() if layer.type == "Result"]
    if len(parameters) != 1 or len(results) != 1:
        raise UnsupportedGraph(
            f"{xml_path.name}: {len(parameters)} inputs and {len(results)} outputs; an embedding model has one of each"
        )
    return IRGraph(layers, parameters[0], results[0])


def _constant(layer: Layer, weights: bytes) -> np.ndarray:
    dtype = np.dtype(ELEMENT_TYPES[layer.attrs["element_type"]])
    shape = [int(d) for d in layer.attrs.get("shape", "").split(",") if d.strip()]
    offset, size = int(layer.attrs["offset"]), int(layer.attrs["size"])
    if offset + size > len(weights):
        raise UnsupportedGraph(
            f"constant {layer.name!r} reads bytes {offset}..{offset + size} of a {len(weights)}-byte .bin"
        )
    return np.frombuffer(weights, dtype, count=size // dtype.itemsize, offset=offset).reshape(shape).copy()


# Inputs that are data (tensors computed from the image); the others of these ops are constants read as values.
DATA_INPUTS = {
    "Reshape": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "ReduceMean": (0,),
    "ReduceSum": (0,),
    "ReduceMax": (0,),
    "MVN": (0,),
    "Gather": (0,),
    "Transpose": (0,),
    "Pad": (0,),
}


def _pads(
    layer: Layer, x: torch.Tensor, kernel: List[int], strides: List[int], dilations: List[int]
) -> Tuple[List[int], List[int]]:
    """(begin, end) paddings of a spatial op, from explicit pads or auto_pad."""
    auto = layer.attrs.get("auto_pad", "explicit")
    if auto == "valid":
        return [0, 0], [0, 0]
    if auto in ("same_upper", "same_lower"):
        begin, end = [], []
        for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto == "same_upper" else large)
            end.append(large if auto == "same_upper" else small)
        return begin, end
    return layer.ints("pads_begin") or [0, 0], layer.ints("pads_end") or [0, 0]


def _pad(x: torch.Tensor, begin: List[int], end: List[int], value: float = 0.0) -> torch.Tensor:
    return F.pad(
        x, [end_or_begin for b, e in zip(reversed(begin), reversed(end)) for end_or_begin in (b, e)], value=value
    )


def _convolution(layer: Layer, x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    strides, dilations = layer.ints("strides"), layer.ints("dilations")
    begin, end = _pads(layer, x, list(weight.shape[2:]), strides, dilations)
    if begin == end:
        return F.conv2d(x, weight, stride=strides, padding=begin, dilation=dilations, groups=groups)
    return F.conv2d(_pad(x, begin, end), weight, stride=strides, dilation=dilations, groups=groups)


def _group_convolution(layer: Layer, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    groups = weight.shape[0]
    return _convolution(layer, x, weight.reshape(groups * weight.shape[1], *weight.shape[2:]), groups)


def _pool(layer: Layer, x: torch.Tensor, kind: str) -> torch.Tensor:
    kernel, strides = layer.ints("kernel"), layer.ints("strides")
    dilations = layer.ints("dilations") or [1, 1]
    begin, end = _pads(layer, x, kernel, strides, dilations)
    ceil = layer.attrs.get("rounding_type", "floor") == "ceil"
    if kind == "max":
        if begin != end or any(b > k // 2 for b, k in zip(begin, kernel)):
            return F.max_pool2d(_pad(x, begin, end, float("-inf")), kernel, strides, dilation=dilations, ceil_mode=ceil)
        return F.max_pool2d(x, kernel, strides, padding=begin, dilation=dilations, ceil_mode=ceil)
    include_pad = layer.attrs.get("exclude-pad", "false") != "true"
    if begin != end:
        raise UnsupportedGraph(f"AvgPool {layer.name!r} with uneven padding {begin} / {end}")
    return F.avg_pool2d(x, kernel, strides, padding=begin, ceil_mode=ceil, count_include_pad=include_pad)


def _mvn(layer: Layer, x: torch.Tensor, axes: np.ndarray) -> torch.Tensor:
    dims = [int(a) % x.dim() for a in np.atleast_1d(axes)]
    centred = x - x.mean(dim=dims, keepdim=True)
    if layer.attrs.get("normalize_variance", "true") != "true":
        return centred
    variance = centred.pow(2).mean(dim=dims, keepdim=True)
    eps = float(layer.attrs.get("eps", "1e-9"))
    if layer.attrs.get("eps_mode", "inside_sqrt").lower() == "inside_sqrt":
        return centred / torch.sqrt(variance + eps)
    return centred / (torch.sqrt(variance) + eps)


def _reduce(layer: Layer, x: torch.Tensor, axes: np.ndarray, how: Callable) -> torch.Tensor:
    dims = [int(a) % x.dim() for a in np.atleast_1d(axes)]
    return how(x, dims, layer.attrs.get("keep_dims", "false") == "true")


def _declared_shape(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """Reshape to the layer's declared output shape, the batch (dim 0) left free. Refused where dim 0 is not
    the batch on both sides: such a reshape would mix images."""
    shape = layer.shapes[0]
    if not shape or not layer.input_shapes[0] or shape[0] != layer.input_shapes[0][0]:
        raise UnsupportedGraph(
            f"{layer.type} {layer.name!r} {layer.input_shapes[0]} -> {shape} moves the batch dimension"
        )
    return x.reshape(-1, *shape[1:])


def _matmul(layer: Layer, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if layer.attrs.get("transpose_a", "false") == "true":
        a = a.transpose(-1, -2)
    if layer.attrs.get("transpose_b", "false") == "true":
        b = b.transpose(-1, -2)
    return torch.matmul(a, b)


def _prelu(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x, x * _channel_slope(x, slope))


def _channel_slope(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """PReLU's slope as the op broadcasts it: a 1-D slope of C values runs along axis 1, anything else as numpy."""
    if slope.dim() == 1 and x.dim() > 1 and slope.numel() == x.shape[1] and slope.numel() > 1:
        return slope.view(1, -1, *([1] * (x.dim() - 2)))
    return slope


def _constant_pad(layer: Layer, x: torch.Tensor, begin, end, value) -> torch.Tensor:
    if layer.attrs.get("pad_mode", "constant") != "constant":
        raise UnsupportedGraph(f"Pad {layer.name!r} in mode {layer.attrs['pad_mode']}: only constant padding")
    begin, end = np.asarray(begin).reshape(-1), np.asarray(end).reshape(-1)
    if begin[:2].any() or end[:2].any():
        raise UnsupportedGraph(f"Pad {layer.name!r} pads the batch or the channels")
    fill = float(layer.attrs.get("pad_value", 0.0)) if value is None else float(value.reshape(-1)[0])
    return _pad(x, [int(b) for b in begin[2:]], [int(e) for e in end[2:]], fill)


def _gather(layer: Layer, x: torch.Tensor, indices: np.ndarray, axis: np.ndarray) -> torch.Tensor:
    dim = int(np.asarray(axis).reshape(-1)[0]) % x.dim()
    if dim == 0 or indices.dim() != 1:
        raise UnsupportedGraph(f"Gather {layer.name!r} on axis {dim} with {indices.dim()}-D indices")
    return torch.index_select(x, dim, indices)


def _transpose(layer: Layer, x: torch.Tensor, order: np.ndarray) -> torch.Tensor:
    order = [int(o) for o in np.asarray(order).reshape(-1)]
    if order[0] != 0:
        raise UnsupportedGraph(f"Transpose {layer.name!r} moves the batch dimension ({order})")
    return x.permute(order)


OPS: Dict[str, Callable] = {
    "Convolution": _convolution,
    "GroupConvolution": _group_convolution,
    "Add": lambda layer, a, b: a + b,
    "Subtract": lambda layer, a, b: a - b,
    "Multiply": lambda layer, a, b: a * b,
    "Divide": lambda layer, a, b: a / b,
    "ReLU": lambda layer, x: F.relu(x),
    "Sigmoid": lambda layer, x: torch.sigmoid(x),
    "Tanh": lambda layer, x: torch.tanh(x),
    "Clamp": lambda layer, x: x.clamp(float(layer.attrs["min"]), float(layer.attrs["max"])),
    "HSwish": lambda layer, x: F.hardswish(x),
    "HSigmoid": lambda layer, x: F.hardsigmoid(x),
    "Swish": lambda layer, x, beta=None: x * torch.sigmoid(x if beta is None else x * beta),
    "PReLU": lambda layer, x, slope: _prelu(x, slope),
    "MaxPool": lambda layer, x: _pool(layer, x, "max"),
    "AvgPool": lambda layer, x: _pool(layer, x, "avg"),
    "ReduceMean": lambda layer, x, axes: _reduce(layer, x, axes, lambda t, d, k: t.mean(dim=d, keepdim=k)),
    "ReduceSum": lambda layer, x, axes: _reduce(layer, x, axes, lambda t, d, k: t.sum(dim=d, keepdim=k)),
    "ReduceMax": lambda layer, x, axes: _reduce(layer, x, axes, lambda t, d, k: t.amax(dim=d, keepdim=k)),
    "MVN": _mvn,
    "MatMul": _matmul,
    "Reshape": lambda layer, x, shape: _declared_shape(layer, x),
    "Squeeze": lambda layer, x, *axes: _declared_shape(layer, x),
    "Unsqueeze": lambda layer, x, axes: _declared_shape(layer, x),
    "Concat": lambda layer, *xs: torch.cat(xs, dim=int(layer.attrs["axis"]) % xs[0].dim()),
    "Gather": _gather,
    "Transpose": _transpose,
    "Softmax": lambda layer, x: torch.softmax(x, dim=int(layer.attrs["axis"]) % x.dim()),
    "Convert": lambda layer, x: x.float(),
    "Pad": lambda layer, x, begin, end, value=None: _constant_pad(layer, x, begin, end, value),
    "Result": lambda layer, x: x,
}


class IRNetwork(nn.Module):
    """The IR's layers from its input (or from layer ``start``) to ``until`` (default: its output) as torch ops.
    With ``head_weights`` every float constant up to the IR's output is a parameter, so a head after ``until``
    can run with ``apply`` on the same weights; without, only those the layers it runs read. ``forward(x)``
    takes the IR's input layout (float NCHW, the channel order the IR expects), or ``start``'s output."""

    def __init__(
        self, graph: IRGraph, until: Optional[str] = None, start: Optional[str] = None, head_weights: bool = True
    ):
        super().__init__()
        self.graph, self.start = graph, start or graph.parameter
        self.order = data_order(graph, until or graph.result, self.start)
        self.full_order = data_order(graph, graph.result, self.start)
        if start and graph.parameter in self.full_order:
            raise UnsupportedGraph(
                f"{graph.layers[start].type} {graph.layers[start].name!r} is not on every path from the input "
                f"to the output: the layers after it cannot run from its output alone"
            )
        weighted = self.full_order if head_weights else self.order
        needed = {source for layer_id in weighted for source, _ in graph.layers[layer_id].inputs}
        self.weights = nn.ParameterDict(
            {
                f"c{source}": nn.Parameter(torch.from_numpy(graph.layers[source].value.astype(np.float32)))
                for source in sorted(needed)
                if graph.layers[source].value is not None and graph.layers[source].value.dtype.kind == "f"
            }
        )
        for (
            layer_id
        ) in self.order:  # a Gather's indices as a tensor, so that tracing records them as the constant they are
            if graph.layers[layer_id].type == "Gather":
                source = graph.layers[layer_id].inputs[1][0]
                self.register_buffer(
                    f"i{source}", torch.as_tensor(graph.layers[source].value.astype(np.int64)), persistent=False
                )

    def argument(self, source: Tuple[str, int], values: Dict[str, torch.Tensor]):
        """A layer's input: a computed tensor, a float constant's parameter, or an integer constant's array."""
        layer_id, index = source
        if layer_id in values:
            if index != 0:
                raise UnsupportedGraph(
                    f"output {index} of {self.graph.layers[layer_id].type} "
                    f"{self.graph.layers[layer_id].name!r} is used as data"
                )
            return values[layer_id]
        if f"c{layer_id}" in self.weights:
            return self.weights[f"c{layer_id}"]
        return getattr(self, f"i{layer_id}", self.graph.layers[layer_id].value)

    def apply(self, layer: Layer, values: Dict[str, torch.Tensor]) -> torch.Tensor:
        return OPS[layer.type](layer, *(self.argument(source, values) for source in layer.inputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self.order)

    def source_output(self, x: torch.Tensor) -> torch.Tensor:
        """The IR's own output, whatever ``until`` is: what the imported model's maps must average to."""
        return self._run(x, self.full_order)

    def _run(self, x: torch.Tensor, order: List[str]) -> torch.Tensor:
        values = {self.start: x}
        for layer_id in order:
            if layer_id != self.start:
                values[layer_id] = self.apply(self.graph.layers[layer_id], values)
        return values[order[-1]]


def data_order(graph: IRGraph, target: str, start: Optional[str] = None) -> List[str]:
    """The layers ``target`` depends on through data inputs, back to the input or to ``start``, in the IR's
    (topological) order."""
    layers, seen, stack = graph.layers, set(), [target]
    while stack:
        layer = layers[stack.pop()]
        if layer.id in seen or layer.value is not None:
            continue
        if layer.type not in OPS and layer.type != "Parameter":
            raise UnsupportedGraph(
                f"OpenVINO op {layer.type} ({layer.name!r}) is not supported; supported: {', '.join(sorted(OPS))}"
            )
        seen.add(layer.id)
        if layer.id != start:
            data = DATA_INPUTS.get(layer.type, range(len(layer.inputs)))
            stack.extend(layer.inputs[i][0] for i in data)
    return [layer_id for layer_id in layers if layer_id in seen]


def last_stage_start(graph: IRGraph, map_layer: str) -> str:
    """Where the IR's last stage begins, as CAMA's branches copy it: the latest layer whose map is larger than
    ``map_layer``'s and through which every path from the input to ``map_layer`` passes (a residual block's
    input is not: its shortcut goes around)."""
    map_cells = graph.layers[map_layer].shapes[0][2:]
    for layer_id in reversed(data_order(graph, map_layer)[:-1]):
        shape = graph.layers[layer_id].shapes[0]
        if len(shape) == 4 and shape[2:] != map_cells and graph.parameter not in data_order(graph, map_layer, layer_id):
            return layer_id
    raise UnsupportedGraph(
        f"no layer before the last map {graph.layers[map_layer].name!r} that a branch can start from"
    )


# The head after the last map: ops that are affine (their offsets dropped in the linear part) or piecewise
# linear; anything else there would make the per-cell decomposition inexact, so it is refused.
OFFSET_OPS = ("Add", "Subtract")
LINEAR_OPS = (
    "Multiply",
    "Divide",
    "MatMul",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Convert",
    "Convolution",
    "GroupConvolution",
)
ACTIVATION_SLOPES = {
    "ReLU": lambda layer, x, *_: (x > 0).to(x.dtype),
    "PReLU": lambda layer, x, slope: torch.where(x >= 0, torch.ones_like(x), _channel_slope(x, slope).expand_as(x)),
    "Clamp": lambda layer, x: ((x > float(layer.attrs["min"])) & (x < float(layer.attrs["max"]))).to(x.dtype),
}


class IRHead:
    """Where the IR's last map ends and its head begins: the global pooling layer, and the head's layers after
    it in order; ``steps`` and ``cell_shares`` read the weights of ``network``."""

    def __init__(self, graph: IRGraph):
        self.graph, self.layers = graph, []
        layer = graph.layers[graph.layers[graph.result].inputs[0][0]]
        while not self._is_global_pooling(layer):
            self.layers.insert(0, layer)
            layer = graph.layers[self._data_input(layer)]
        self.pooling = layer
        self.map_layer = layer.inputs[0][0]

    def _is_global_pooling(self, layer: Layer) -> bool:
        """A weighted sum over every cell of a 4-D map, channel by channel, into [B, C, 1, 1] (or [B, C] for a
        mean without keep_dims)."""
        if len(layer.input_shapes[0]) != 4:
            return False
        spatial = layer.input_shapes[0][2:]
        if layer.type == "GroupConvolution":
            kernel = layer.input_shapes[1]
            return kernel[1:3] == [1, 1] and kernel[3:] == spatial and layer.shapes[0][2:] == [1, 1]
        if layer.type == "AvgPool":
            return layer.ints("kernel") == spatial and layer.shapes[0][2:] == [1, 1]
        if layer.type != "ReduceMean":
            return False
        axes = {int(axis) % 4 for axis in np.atleast_1d(self.graph.layers[layer.inputs[1][0]].value)}
        return axes == {2, 3}  # over the cells only: a mean over the channels too is no per-channel pooling

    def _data_input(self, layer: Layer) -> str:
        data = [layer.inputs[i][0] for i in DATA_INPUTS.get(layer.type, range(len(layer.inputs)))]
        computed = [source for source in data if self.graph.layers[source].value is None]
        if layer.type not in OFFSET_OPS + LINEAR_OPS + tuple(ACTIVATION_SLOPES) or len(computed) != 1:
            raise UnsupportedGraph(
                f"{layer.type} {layer.name!r} after the last feature map is not an affine or "
                f"piecewise-linear layer "
                "of one input: RAM would not be exact for this head"
            )
        if layer.type == "Divide" and computed[0] != data[0]:
            raise UnsupportedGraph(
                f"Divide {layer.name!r} after the last feature map divides by the data: not linear, "
                f"RAM would not be exact"
            )
        if layer.type in ("Convolution", "GroupConvolution") and layer.input_shapes[0][2:] != [1, 1]:
            raise UnsupportedGraph(
                f"{layer.type} {layer.name!r} after the pooling runs on a {layer.input_shapes[0][2:]} map"
            )
        return computed[0]

    def pooled_shape(self) -> tuple:
        return (-1, *self.pooling.shapes[0][1:])

    def cell_shares(self, network: "IRNetwork") -> Callable[[torch.Tensor], torch.Tensor]:
        pooling = self.pooling
        if pooling.type == "GroupConvolution":
            weight = network.argument(pooling.inputs[1], {})
            return lambda maps: maps * weight.reshape(1, weight.shape[0], *weight.shape[3:])
        return lambda maps: maps / (maps.shape[2] * maps.shape[3])

    def steps(self, network: "IRNetwork") -> List:
        from model_zoo.importers.exact_head import HeadStep

        steps, previous = [], self.pooling.id
        for layer in self.layers:
            affine = self._runner(network, layer, previous)
            if layer.type in ACTIVATION_SLOPES:
                slope_of = ACTIVATION_SLOPES[layer.type]
                constants = [network.argument(source, {}) for source in layer.inputs[1:]]
                steps.append(
                    HeadStep(
                        affine,
                        None,
                        lambda x, layer=layer, slope_of=slope_of, constants=constants: slope_of(layer, x, *constants),
                    )
                )
            elif layer.type in OFFSET_OPS:
                negated = layer.type == "Subtract" and layer.inputs[1][0] == previous
                steps.append(HeadStep(affine, (lambda y: -y) if negated else (lambda y: y)))
            else:
                steps.append(HeadStep(affine, affine))
            previous = layer.id
        return steps

    @staticmethod
    def _runner(network: "IRNetwork", layer: Layer, previous: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: network.apply(layer, {previous: x})


def contract_model(graph: IRGraph, channel_order: str) -> nn.Module:
    """The IR as a contract model (``ExactHeadModel``): uint8 RGB in, the IR's embedding and its exact per-cell
    maps out. ``channel_order``: the order the IR reads ("bgr" for Open Model Zoo's IRs, OpenVINO's convention)."""
    from model_zoo.importers.exact_head import ExactHeadModel

    head = IRHead(graph)
    network = IRNetwork(graph, until=head.map_layer)
    return ExactHeadModel(
        ir_input(channel_order),
        network,
        head.cell_shares(network),
        head.pooled_shape(),
        head.steps(network),
        network.source_output,
    )


def ir_input(channel_order: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 RGB [B, H, W, 3] -> the IR's input: float NCHW in ``channel_order`` ("bgr" or "rgb")."""
    return partial(_nchw, bgr=channel_order == "bgr")


def _nchw(images: torch.Tensor, bgr: bool) -> torch.Tensor:
    x = images.permute(0, 3, 1, 2).float()
    return x[:, [2, 1, 0]] if bgr else x


def input_size(graph: IRGraph) -> Tuple[int, int]:
    shape = graph.layers[graph.parameter].shapes[0]
    if len(shape) != 4 or shape[1] != 3:
        raise UnsupportedGraph(f"input shape {shape}: an image model reads [1, 3, H, W]")
    return shape[2], shape[3]


def embedding_size(graph: IRGraph) -> int:
    """The size of the IR's output vector, as its XML declares it."""
    return int(np.prod(graph.layers[graph.result].input_shapes[0][1:]))
