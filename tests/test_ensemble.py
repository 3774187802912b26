"""``python -m model_zoo ensemble`` (model_zoo/ensemble.py): contract files as branches of one, on tiny models made
here; the file is read as the service reads it (ONNX Runtime, the contract checked)."""

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from model_zoo.__main__ import main
from model_zoo.contract import INPUT_IMAGES, OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS, PRECISION_KEY, SOURCE_KEY
from model_zoo.contract import identity_error, open_cpu_session
from model_zoo.ensemble import EnsembleError, check_compatible, ensemble, read_member
from model_zoo.files import sha256_of
from tests.conftest import TINY_HEIGHT, TINY_WIDTH


def retrained(source, path, seed: int):
    """The same contract file with every weight moved by noise: another member of the same shape."""
    proto = onnx.load(str(source))
    rng = np.random.default_rng(seed)
    for tensor in proto.graph.initializer:
        weights = numpy_helper.to_array(tensor)
        if weights.dtype == np.float32 and weights.size > 1:
            noisy = weights * (1 + 0.3 * rng.standard_normal(weights.shape)).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(noisy, tensor.name))
    onnx.save(proto, str(path))
    return path


def run(path, images):
    session, contract = open_cpu_session(path)
    embedding, maps = session.run([OUTPUT_EMBEDDING, OUTPUT_FEATURE_MAPS], {INPUT_IMAGES: images})
    return contract, embedding, maps


def test_members_become_branches_and_the_score_averages_theirs_by_branch_count(tiny_model, tmp_path):
    first = tiny_model[1]
    second = retrained(first, tmp_path / "second.onnx", seed=1)
    summary = ensemble([first, second, first], tmp_path / "ensemble.onnx")
    assert summary["branches"] == 6 and max(summary["parity"].values()) < 1e-5

    images = np.random.default_rng(0).integers(0, 256, (5, TINY_HEIGHT, TINY_WIDTH, 3), dtype=np.uint8)
    contract, embedding, maps = run(tmp_path / "ensemble.onnx", images)
    members = {path: run(path, images) for path in (first, second)}
    assert np.allclose(embedding, np.concatenate([members[p][1] for p in (first, second, first)], axis=1), atol=1e-6)
    assert maps.shape == (5, 6, *members[first][2].shape[2:])
    assert identity_error(embedding, maps) < 1e-5

    def score(contract, embedding):  # the contract's score: dot / N, image 0 against the others
        return embedding[1:] @ embedding[0] / contract.num_branches

    first_score, second_score = (score(*members[p][:2]) for p in (first, second))
    assert np.allclose(score(contract, embedding), (2 * first_score + second_score) / 3, atol=1e-6)
    assert not np.allclose(first_score, second_score, atol=1e-3)

    metadata = onnx.load(str(tmp_path / "ensemble.onnx")).metadata_props
    metadata = {prop.key: prop.value for prop in metadata}
    source = json.loads(metadata[SOURCE_KEY])
    assert source["format"] == "ensemble"
    assert [m["sha256"] for m in source["members"]] == [sha256_of(p) for p in (first, second, first)]
    assert contract.architecture == "ensemble" and contract.evaluation == {} and contract.verification == {}


def test_members_that_cannot_share_one_file_are_refused_by_name(tiny_model, tiny_ir, tmp_path):
    from model_zoo.importers import import_model

    other_maps = tmp_path / "imported.onnx"
    import_model(tiny_ir, other_maps)
    with pytest.raises(EnsembleError, match="imported.onnx's map shape"):
        ensemble([tiny_model[1], other_maps], tmp_path / "out.onnx")

    proto = onnx.load(str(tiny_model[1]))
    proto.metadata_props.add(key=PRECISION_KEY, value="int8")
    onnx.save(proto, str(tmp_path / "labelled_int8.onnx"))
    with pytest.raises(EnsembleError, match="labelled_int8.onnx is int8"):
        ensemble([tiny_model[1], tmp_path / "labelled_int8.onnx"], tmp_path / "out.onnx")
    member = read_member(tiny_model[1])
    other_opset = onnx.ModelProto()
    other_opset.CopyFrom(member.proto)
    next(o for o in other_opset.opset_import if o.domain in ("", "ai.onnx")).version += 1
    with pytest.raises(EnsembleError, match="ONNX opset"):
        check_compatible([member, dataclasses.replace(member, proto=other_opset)])
    with pytest.raises(EnsembleError, match="two members or more"):
        ensemble([tiny_model[1]], tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_the_command_writes_the_file_or_says_why_in_one_line(tiny_model, tmp_path, capsys):
    assert main(["ensemble", str(tiny_model[1]), str(tiny_model[1]), str(tmp_path / "twice.onnx")]) == 0
    assert json.loads(capsys.readouterr().out)["branches"] == 4
    assert main(["ensemble", str(tiny_model[1]), str(tmp_path / "missing.onnx"), str(tmp_path / "out.onnx")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("python -m model_zoo ensemble:") and error.count("\n") == 1
    (tmp_path / "notes.onnx").write_text("not a model")
    assert main(["ensemble", str(tiny_model[1]), str(tmp_path / "notes.onnx"), str(tmp_path / "out.onnx")]) == 1
    assert "notes.onnx: ONNX Runtime cannot read it" in capsys.readouterr().err


def test_the_service_serves_an_ensemble_and_adapt_takes_it_as_any_contract_file(tiny_model, tmp_path):
    from tests.server import assert_heatmaps_sum_to_scores
    from tests.test_adaptation import write_crops
    from training.adaptation import adapt
    from training.adaptation.loop import AdaptationSettings

    second = retrained(tiny_model[1], tmp_path / "second.onnx", seed=2)
    ensemble([tiny_model[1], second], tmp_path / "ensemble.onnx")
    assert_heatmaps_sum_to_scores(tmp_path / "ensemble.onnx", tmp_path / "g.sqlite3", "ensemble", 4)

    settings = AdaptationSettings(epochs=2, min_samples=2, eps=0.5, k1=6, k2=3, steps_per_epoch=5, batch_size=16)
    adapt(tmp_path / "ensemble.onnx", str(write_crops(tmp_path / "crops")), tmp_path / "adapted.onnx", None, settings)
    images = np.random.default_rng(1).integers(0, 256, (3, TINY_HEIGHT, TINY_WIDTH, 3), dtype=np.uint8)
    contract, embedding, maps = run(tmp_path / "adapted.onnx", images)
    assert contract.num_branches == 4 and identity_error(embedding, maps) < 1e-5
