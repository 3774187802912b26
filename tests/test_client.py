"""The Python client (client/) and its CLI against a real server: sync and async, typed answers, errors."""

import asyncio
import json

import pytest

from client import AsyncReIDClient, ReIDClient, ReIDError
from client.cli import main as cli, market_ids
from tests.conftest import image_bytes, person_image
from harness.server import ServiceProcess


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    _, onnx_path = tiny_model
    with ServiceProcess(onnx_path, tmp_path_factory.mktemp("client") / "gallery.sqlite3", api_key="secret") as process:
        yield process


@pytest.fixture
def reid(server):
    with ReIDClient(server.url, api_key="secret") as client:
        for item in list(client.iter_gallery()):
            client.delete(item.id)
        yield client


def test_enrol_query_page_read_and_delete(reid, tmp_path):
    path = tmp_path / "a.png"
    person_image(1, 1).save(path)
    items = reid.enroll(
        [path, image_bytes(1, 2), ("b.jpg", image_bytes(2, 1))],
        person_id=["1", "1", "2"],
        camera_id="c1",
        metadata={"site": "gate"},
    )
    assert [i.person_id for i in items] == ["1", "1", "2"] and all(i.metadata == {"site": "gate"} for i in items)
    result = reid.query(image_bytes(1, 2), top_k=3)
    assert result.matches[0].id == items[1].id and result.matches[0].score == pytest.approx(1.0, abs=1e-4)
    assert result.matches[0].heatmap["grid"] and result.query_heatmap and result.gallery_size == 3
    assert reid.query(image_bytes(1, 2), top_k=2, heatmaps=False, person_id="2").matches[0].person_id == "2"
    assert [i.id for i in reid.iter_gallery(page_size=2)] == [i.id for i in items]
    assert reid.item(items[0].id).raw["image_format"] == "PNG" and reid.image(items[0].id) == path.read_bytes()
    reid.delete(items[0].id)
    assert reid.gallery().total == 2


def test_errors_carry_the_documented_code(reid, server):
    with pytest.raises(ReIDError) as error:
        reid.item(10**12)
    assert (error.value.status, error.value.code) == (404, "not_found")
    with pytest.raises(ReIDError) as error:
        reid.enroll([b"not an image"])
    assert error.value.code == "invalid_image"
    with ReIDClient(server.url) as anonymous, pytest.raises(ReIDError) as error:
        anonymous.model()
    assert (error.value.status, error.value.code) == (401, "unauthorized")


def test_the_async_client_does_the_same(reid, server):
    async def run():
        async with AsyncReIDClient(server.url, api_key="secret") as client:
            items = await client.enroll([image_bytes(3, 1), image_bytes(4, 1)], person_id=["3", "4"])
            found = await asyncio.gather(*(client.query(image_bytes(p, 1), top_k=1, heatmaps=False) for p in (3, 4)))
            listed = [item.id async for item in client.iter_gallery(page_size=1)]
            return items, found, listed

    items, found, listed = asyncio.run(run())
    assert [r.matches[0].id for r in found] == [i.id for i in items] and listed == [i.id for i in items]


def test_the_cli_enrols_a_market_folder_and_saves_a_query_with_overlays(reid, server, tmp_path, capsys):
    folder = tmp_path / "market"
    folder.mkdir()
    for pid, cam, variant in ((5, 1, 1), (5, 2, 2), (6, 1, 3)):
        person_image(pid, variant).save(folder / f"{pid:04d}_c{cam}s1_{variant:06d}_00.jpg")
    assert market_ids(folder / "0005_c2s1_000002_00.jpg") == (
        "0005",
        "c2",
    )  # the id as written, as curl and the page send it
    common = ["--url", server.url, "--api-key", "secret"]
    cli([*common, "enrol", str(folder), "--market-names", "--batch", "2"])
    assert "enrolled 3 images" in capsys.readouterr().out
    assert sorted((i.person_id, i.camera_id) for i in reid.iter_gallery()) == [
        ("0005", "c1"),
        ("0005", "c2"),
        ("0006", "c1"),
    ]
    query = folder / "0005_c2s1_000002_00.jpg"
    cli([*common, "query", str(query), "--top-k", "2", "--save", str(tmp_path / "out")])
    assert "score" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert len(saved["matches"]) == 2 and "overlay_png" not in saved["matches"][0]["heatmap"]
    assert (tmp_path / "out" / "query.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "out").glob("match*.png"))) == 2
    track = [folder / "0005_c1s1_000001_00.jpg", query]
    cli([*common, "query", *map(str, track), "--aggregate", "best", "--group-by-person", "--no-heatmaps"])
    printed = capsys.readouterr().out.splitlines()
    persons = [line.split()[3] for line in printed[1:-1]]
    assert persons[0] == "0005" and len(persons) == len(set(persons)) == 2  # one match per person, person 5 first
    cli([*common, "verify", str(query), str(folder / "0005_c1s1_000001_00.jpg")])
    assert capsys.readouterr().out.startswith("score ")


def test_the_cli_enrols_image_files_beside_folders_and_names_an_empty_one(reid, server, tmp_path, capsys):
    folder, lone = tmp_path / "crops", tmp_path / "lone.jpg"
    folder.mkdir()
    person_image(7, 1).save(folder / "a.jpg")
    person_image(7, 2).save(lone)
    common = ["--url", server.url, "--api-key", "secret"]
    cli([*common, "enrol", str(folder), str(lone), "--person-id", "7"])
    assert "enrolled 2 images" in capsys.readouterr().out
    assert [item.person_id for item in reid.iter_gallery()] == ["7", "7"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stopped:
        cli([*common, "enrol", str(tmp_path / "empty")])
    assert str(stopped.value.code).startswith("error: no images in ")


def test_the_cli_says_in_one_line_what_went_wrong(tmp_path, capsys):
    for args in (
        ["--url", "http://127.0.0.1:9", "erase-person", "7"],
        ["--url", "not a url", "delete", "1"],
        ["--url", "http://127.0.0.1:9", "enrol", str(tmp_path / "absent")],
    ):
        with pytest.raises(SystemExit) as stopped:
            cli(args)
        message = str(stopped.value.code)
        assert message.startswith("error: ") and "\n" not in message, message
