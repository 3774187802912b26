"""The model files in the package open under the contract: a rewrite across the repository once changed bytes
inside four shipped files, which then no runtime could read."""

import pytest

from model_zoo import SHIPPED_MODELS_DIR
from model_zoo.contract import open_cpu_session

SHIPPED = sorted(SHIPPED_MODELS_DIR.glob("*.onnx"))


def test_the_package_ships_the_default_model_and_its_int8_file():
    from model_zoo import DEFAULT_MODEL_PATH

    assert {DEFAULT_MODEL_PATH, DEFAULT_MODEL_PATH.with_suffix(".int8.onnx")} <= set(SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=[path.name for path in SHIPPED])
def test_a_shipped_model_file_opens_under_the_contract(path):
    _, contract = open_cpu_session(path)
    assert contract.embedding_dim > 0


def test_the_source_ir_of_the_defaults_first_member_ships_beside_it_as_its_metadata_names_it():
    """``training adapt --model DEFAULT_SOURCE_IR`` adapts the default's first member's own network: the IR must be
    the one that member was imported from, byte for byte (both files' sha256 as ``reid.source`` records them)."""
    import json

    from model_zoo import DEFAULT_MODEL_PATH, DEFAULT_SOURCE_IR
    from model_zoo.files import sha256_of

    session, _ = open_cpu_session(DEFAULT_MODEL_PATH)
    source = json.loads(session.get_modelmeta().custom_metadata_map["reid.source"])
    shipped = {path.name: sha256_of(path) for path in (DEFAULT_SOURCE_IR, DEFAULT_SOURCE_IR.with_suffix(".bin"))}
    assert source["members"][0]["source"]["files"] == shipped
