"""Ensembles of contract files: ``python -m model_zoo ensemble A.onnx B.onnx ... OUT.onnx``.

Each member becomes branches of one contract file. The graph runs every distinct member once on the shared uint8
input and concatenates the members' ``embedding`` and ``feature_maps`` along the branch axis, in the order the
members are listed. The contract's score, the mean of the branches' cosines, is then the mean of the members'
scores weighted by their branch counts, a member listed twice weighing twice; RAM stays exact, each branch's maps
averaging to its own slice. Members must agree on the input size and on the maps' shape (D, h, w), and be fp32
(quantize the ensemble instead). Optional outputs are dropped. ``reid.source`` names every member with its
sha256 and its own record; ``reid.evaluation`` and ``reid.verification`` start empty: the members' figures
and thresholds do not hold for the ensemble, so evaluate and calibrate it.

Imports onnx, numpy and ONNX Runtime, never torch: the service may read what it writes.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import onnx
from onnx import compose, helper

from model_zoo.contract import (
    ADAPTATION_KEY,
    INPUT_IMAGES,
    ContractError,
    OUTPUT_EMBEDDING,
    OUTPUT_FEATURE_MAPS,
    SOURCE_KEY,
    ModelContract,
    identity_error,
    open_cpu_session,
    precision_of,
)
from model_zoo.files import sha256_of

ENSEMBLE_FORMAT = "ensemble"
PARITY_TOLERANCE = 1e-5  # the ensemble against its members run alone: the same float32 graph, so rounding only
PARITY_IMAGES = 4


class EnsembleError(ValueError):
    """Members that cannot form one contract file, or a written file that does not agree with them."""


@dataclass(frozen=True)
class Member:
    path: Path
    proto: onnx.ModelProto
    session: Any  # ONNX Runtime's, opened to check the contract; the parity check runs the member alone on it
    contract: ModelContract
    metadata: Dict[str, str]


def read_member(path: Path) -> Member:
    """A member file, its contract checked by ONNX Runtime as the service checks it."""
    if not path.is_file():
        raise EnsembleError(f"{path}: no such file")
    try:
        session, contract = open_cpu_session(path)
    except ContractError:
        raise
    except Exception as exc:  # ONNX Runtime's own errors derive from Exception alone
        raise EnsembleError(f"{path.name}: ONNX Runtime cannot read it ({str(exc).splitlines()[0]})") from None
    proto = onnx.load(str(path))
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    if precision_of(metadata) != "fp32":
        raise EnsembleError(f"{path.name} is {precision_of(metadata)}: ensemble the fp32 files, then quantize")
    return Member(path, proto, session, contract, metadata)


def default_opset(member: Member) -> int:
    return next((o.version for o in member.proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def check_compatible(members: Sequence[Member]) -> None:
    """The members' shared input size, map shape and opset, which one contract file needs (an operator's meaning
    may change between opsets, so one graph cannot mix them)."""
    first = members[0]
    for member in members[1:]:
        for what, of in (
            ("input size", lambda m: (m.contract.input_height, m.contract.input_width)),
            ("map shape (D, h, w)", lambda m: (m.contract.branch_dim, m.contract.map_height, m.contract.map_width)),
            ("ONNX opset", default_opset),
        ):
            if of(member) != of(first):
                raise EnsembleError(f"{member.path.name}'s {what} is {of(member)}, {first.path.name}'s {of(first)}")


def prefixed(member: Member, prefix: str) -> onnx.ModelProto:
    """The member with every name prefixed, its graph reading the shared input."""
    model = compose.add_prefix(member.proto, prefix)
    for node in model.graph.node:
        node.input[:] = [INPUT_IMAGES if name == prefix + INPUT_IMAGES else name for name in node.input]
    return model


def ensemble_proto(listed: Sequence[Member], distinct: Sequence[Member]) -> onnx.ModelProto:
    """One graph: each distinct member once, its outputs concatenated in the listed order."""
    prefixes = {member.path: f"member{i}/" for i, member in enumerate(distinct)}
    models = [prefixed(member, prefixes[member.path]) for member in distinct]
    graphs = [model.graph for model in models]
    concat = [
        helper.make_node("Concat", [prefixes[m.path] + output for m in listed], [output], axis=1)
        for output in (OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS)
    ]
    first = listed[0].contract
    branches = sum(member.contract.num_branches for member in listed)
    outputs = [
        helper.make_tensor_value_info(OUTPUT_EMBEDDING, onnx.TensorProto.FLOAT, ["batch", branches * first.branch_dim]),
        helper.make_tensor_value_info(
            OUTPUT_FEATURE_MAPS,
            onnx.TensorProto.FLOAT,
            ["batch", branches, first.branch_dim, first.map_height, first.map_width],
        ),
    ]
    graph = helper.make_graph(
        [node for g in graphs for node in g.node] + concat,
        ENSEMBLE_FORMAT,
        [helper.make_tensor_value_info(INPUT_IMAGES, onnx.TensorProto.UINT8, ["batch", *input_shape(first)])],
        outputs,
        initializer=[tensor for g in graphs for tensor in g.initializer],
    )
    opsets: Dict[str, int] = {}
    for member in distinct:  # one default opset (check_compatible); other domains' highest
        for opset in member.proto.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
        functions=[function for member in models for function in member.functions],
    )
    model.ir_version = max(member.proto.ir_version for member in distinct)
    return model


def input_shape(contract: ModelContract) -> List[int]:
    """An image's shape as the contract's input holds it: H x W x 3."""
    return [contract.input_height, contract.input_width, 3]


def ensemble_metadata(listed: Sequence[Member]) -> Dict[str, str]:
    """The contract's keys for the whole, and ``reid.source``: every listed member with its own record."""
    first = listed[0].contract
    contract = ModelContract(
        architecture=ENSEMBLE_FORMAT,
        backbone=" + ".join(member.contract.backbone for member in listed),
        num_branches=sum(member.contract.num_branches for member in listed),
        branch_dim=first.branch_dim,
        map_height=first.map_height,
        map_width=first.map_width,
        input_height=first.input_height,
        input_width=first.input_width,
        training_data="; ".join(dict.fromkeys(member.contract.training_data for member in listed)),
        config={"members": [member.path.name for member in listed]},
        feature_maps_kind=(
            "attribution"
            if any(member.contract.feature_maps_kind == "attribution" for member in listed)
            else "activations"
        ),
    )
    members = [
        {
            "file": member.path.name,
            "sha256": sha256_of(member.path),
            "architecture": member.contract.architecture,
            "branches": member.contract.num_branches,
            "source": json.loads(member.metadata.get(SOURCE_KEY, "null")),
            "adapted": ADAPTATION_KEY in member.metadata,
        }
        for member in listed
    ]
    return {**contract.to_metadata(), SOURCE_KEY: json.dumps({"format": ENSEMBLE_FORMAT, "members": members})}


def parity(output: Path, listed: Sequence[Member], distinct: Sequence[Member], seed: int = 0) -> Dict[str, float]:
    """The written file against its members run alone (each distinct one once) on random images: the largest
    differences of ``embedding`` and ``feature_maps`` from the members' concatenated, and the RAM identity's
    error."""
    contract = listed[0].contract
    images = np.random.default_rng(seed).integers(0, 256, (PARITY_IMAGES, *input_shape(contract)), dtype=np.uint8)
    session, _ = open_cpu_session(output)
    embedding, maps = session.run([OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS], {INPUT_IMAGES: images})
    alone = {m.path: m.session.run([OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS], {INPUT_IMAGES: images}) for m in distinct}
    expected_embedding = np.concatenate([alone[m.path][0] for m in listed], axis=1)
    expected_maps = np.concatenate([alone[m.path][1] for m in listed], axis=1)
    return {
        "embedding": float(np.abs(embedding - expected_embedding).max()),
        "feature_maps": float(np.abs(maps - expected_maps).max()),
        "identity": identity_error(embedding, maps),
    }


def ensemble(members: Sequence[Path], output: Path) -> dict:
    """Write the members as one contract file at ``output`` and check it against them; a summary."""
    if len(members) < 2:
        raise EnsembleError("an ensemble needs two members or more (list a file twice to weigh it twice)")
    read = {path: read_member(path) for path in dict.fromkeys(Path(p) for p in members)}
    listed, distinct = [read[Path(path)] for path in members], list(read.values())
    check_compatible(listed)
    model = ensemble_proto(listed, distinct)
    for key, value in ensemble_metadata(listed).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(output))
    differences = parity(output, listed, distinct)
    if max(differences.values()) > PARITY_TOLERANCE:
        output.unlink()
        raise EnsembleError(f"the ensemble does not agree with its members: {differences}")
    return {
        "output": str(output),
        "bytes": output.stat().st_size,
        "members": [path.name for path in map(Path, members)],
        "branches": sum(member.contract.num_branches for member in listed),
        "parity": differences,
    }
