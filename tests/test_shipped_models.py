"""The model files in the package open under the contract: a rewrite across the repository once changed bytes
inside four shipped files, which then no runtime could read."""

import pytest

from model_zoo import SHIPPED_MODELS_DIR
from model_zoo.contract import open_cpu_session

SHIPPED = sorted(SHIPPED_MODELS_DIR.glob("*.onnx"))


def test_the_package_ships_the_default_model():
    assert "person_reidentification_retail_0277.onnx" in [path.name for path in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=[path.name for path in SHIPPED])
def test_a_shipped_model_file_opens_under_the_contract(path):
    _, contract = open_cpu_session(path)
    assert contract.embedding_dim > 0
