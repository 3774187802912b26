"""A tiny OpenVINO IR shaped as Open Model Zoo's re-ID models, built with OpenVINO's own API: what the import
tests, and the tests that run every registered architecture, use in place of a real IR."""

from pathlib import Path

import numpy as np

from tests.conftest import TINY_HEIGHT, TINY_WIDTH

DIM = 12


def constant(ops, rng, *shape, scale=0.3):
    return ops.constant(rng.normal(0, scale, shape).astype(np.float32))


def omz_like_ir(path: Path, compress_to_fp16: bool = False, before_pooling=None, head_tail=None) -> Path:
    """An IR of TINY_HEIGHT x TINY_WIDTH input: BGR reversal, mean/scale, instance norm, convolutions with uneven
    padding, max and average pooling, a squeeze-excitation gate, a clamp, then the head: a global depthwise
    convolution and its bias, a reshape, FC, a folded batch norm and PReLU. ``before_pooling`` and ``head_tail``
    add ops before the global pooling and after the head."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    image = ops.parameter([1, 3, TINY_HEIGHT, TINY_WIDTH], np.float32, name="data")
    x = ops.gather(image, ops.constant(np.array([2, 1, 0], np.int32)), ops.constant(np.array([1], np.int32)))
    x = ops.multiply(
        ops.subtract(x, ops.constant(np.full((1, 3, 1, 1), 120.0, np.float32))),
        ops.constant(np.full((1, 3, 1, 1), 0.017, np.float32)),
    )
    x = ops.mvn(x, ops.constant(np.array([2, 3], np.int64)), True, 1e-5, "inside_sqrt")
    x = ops.convolution(x, constant(ops, rng, 8, 3, 3, 3), [2, 2], [0, 0], [1, 1], [1, 1])  # uneven padding
    x = ops.relu(ops.add(x, constant(ops, rng, 1, 8, 1, 1)))
    x = ops.max_pool(x, [1, 1], [1, 1], [1, 1], [1, 1], [3, 3]).output(0)
    gate = ops.convolution(
        ops.reduce_mean(x, ops.constant(np.array([2, 3], np.int64)), True),
        constant(ops, rng, 8, 8, 1, 1),
        [1, 1],
        [0, 0],
        [0, 0],
        [1, 1],
    )
    x = ops.multiply(x, ops.sigmoid(gate))
    x = ops.group_convolution(x, constant(ops, rng, 8, 1, 1, 3, 3), [1, 1], [1, 1], [1, 1], [1, 1])
    x = ops.avg_pool(x, [2, 2], [0, 0], [0, 0], [2, 2], True)
    x = ops.clamp(ops.convolution(x, constant(ops, rng, 16, 8, 1, 1), [1, 1], [0, 0], [0, 0], [1, 1]), 0.0, 6.0)
    if before_pooling:
        x = before_pooling(x)
    height, width = list(x.get_output_shape(0))[2:]
    x = ops.add(
        ops.group_convolution(x, constant(ops, rng, 16, 1, 1, height, width), [1, 1], [0, 0], [0, 0], [1, 1]),
        constant(ops, rng, 1, 16, 1, 1),
    )
    x = ops.reshape(x, ops.constant(np.array([1, 16], np.int64)), True)
    x = ops.add(ops.matmul(x, constant(ops, rng, DIM, 16), False, True), constant(ops, rng, 1, DIM))
    x = ops.reshape(x, ops.constant(np.array([1, DIM, 1], np.int64)), True)
    x = ops.add(ops.multiply(x, constant(ops, rng, 1, DIM, 1)), constant(ops, rng, 1, DIM, 1))
    x = ops.prelu(x, ops.constant(np.array([[0.25]], np.float32)))
    x = ops.reshape(x, ops.constant(np.array([1, DIM], np.int64)), True)
    if head_tail:
        x = head_tail(x)
    ov.save_model(ov.Model([x], [image], "tiny-reid"), str(path), compress_to_fp16=compress_to_fp16)
    return path
