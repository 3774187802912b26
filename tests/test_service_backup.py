"""Backup and restore (issue 14) with ``python -m service backup|restore`` against real servers: a backup taken
while a server is serving restores to the same gallery (items, ids, metadata, image bytes, query answers); a
restore is refused while a server holds the store, over a store with items unless --replace, and for a file
that is not an intact gallery store; a restore served by another model is re-embedded."""

import hashlib
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import List

import pytest

from tests.conftest import image_bytes
from harness.server import REPO, ServiceProcess
from tests.test_service_api import enroll, files

pytestmark = pytest.mark.slow
BLOBS = [image_bytes(pid, v) for pid in (801, 802, 803) for v in (1, 2)]


def cli(store: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "REID_STORE_PATH": str(store)}
    return subprocess.run(
        [sys.executable, "-m", "service", *map(str, args)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def refused(result: subprocess.CompletedProcess, reason: str) -> bool:
    return result.returncode != 0 and "refused" in result.stderr and reason in result.stderr


def gallery_state(client) -> dict:
    items = client.get("/gallery", params={"limit": 500}).json()["items"]
    images = {item["id"]: client.get(f"/gallery/{item['id']}/image").content for item in items}
    # the queries search camera c1 only, where the enrolments made during the backup are not
    answers = [
        [
            (m["id"], round(m["score"], 5))
            for m in client.post(
                "/query", files=files(blob, name="image"), data={"top_k": "20", "heatmaps": "false", "camera_id": "c1"}
            ).json()["matches"]
        ]
        for blob in BLOBS
    ]
    return {"items": items, "images": images, "answers": answers}


@pytest.fixture(scope="module")
def served_backup(tiny_model, tmp_path_factory):
    """A backup taken while a server is serving, with enrolments under way: (file, the gallery's state when
    the backup began, every id enrolled)."""
    folder = tmp_path_factory.mktemp("backup")
    backup_file = folder / "backup.sqlite3"
    with ServiceProcess(tiny_model[1], folder / "live.sqlite3") as server, server.client() as client:
        for pid in (801, 802, 803):
            enroll(
                client,
                [image_bytes(pid, 1), image_bytes(pid, 2)],
                person_id=str(pid),
                camera_id="c1",
                metadata='{"site": "gate", "pid": %d}' % pid,
                captured_at="2024-06-01T12:00:00Z",
            )
        before = gallery_state(client)
        later: List[int] = []
        stop = threading.Event()

        def keep_enrolling():
            with server.client() as writer:
                while not stop.is_set():
                    later.extend(enroll(writer, [image_bytes(900, len(later))]))
                    stop.wait(0.02)

        enroller = threading.Thread(target=keep_enrolling)
        enroller.start()
        try:
            result = cli(folder / "live.sqlite3", "backup", backup_file)
            in_use = cli(folder / "live.sqlite3", "restore", backup_file, "--replace")
        finally:
            stop.set()
            enroller.join()
        assert result.returncode == 0 and "backed up" in result.stdout, result.stderr
        assert refused(in_use, "in use by another process")
        assert refused(cli(folder / "live.sqlite3", "backup", backup_file), "--force")
    return backup_file, before, [i["id"] for i in before["items"]] + later


def test_a_backup_restores_to_the_same_gallery(served_backup, tiny_model, tmp_path):
    backup_file, before, all_ids = served_backup
    store = tmp_path / "restored.sqlite3"
    result = cli(store, "restore", backup_file)
    assert result.returncode == 0 and "restored" in result.stdout, result.stderr
    fingerprint = hashlib.sha256(tiny_model[1].read_bytes()).hexdigest()
    assert fingerprint[:12] in result.stdout
    with ServiceProcess(tiny_model[1], store) as server, server.client() as client:
        restored_ids = [i["id"] for i in client.get("/gallery", params={"limit": 500}).json()["items"]]
        # a consistent snapshot: everything enrolled before the backup, then a prefix of what came during it
        assert restored_ids == all_ids[: len(restored_ids)] and len(restored_ids) >= len(before["items"])
        for item_id, image in before["images"].items():
            assert client.get(f"/gallery/{item_id}/image").content == image
        for item in before["items"]:
            assert client.get(f"/gallery/{item['id']}").json() == item
        restored = gallery_state(client)
        assert restored["answers"] == before["answers"]
        assert refused(cli(store, "restore", backup_file, "--replace"), "in use by another process")
    assert refused(cli(store, "restore", backup_file), "--replace")
    assert cli(store, "restore", backup_file, "--replace").returncode == 0


def test_what_is_not_an_intact_gallery_is_refused(served_backup, tmp_path):
    backup_file, _, _ = served_backup
    store = tmp_path / "target.sqlite3"
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 500)
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
    damaged = tmp_path / "damaged.sqlite3"
    data = bytearray(backup_file.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page:] = b"\xa5" * (len(data) - page)  # every page past the first (the schema) overwritten
    damaged.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.sqlite3"
    truncated.write_bytes(backup_file.read_bytes()[: len(data) // 2])
    for bad in (text, other, damaged, truncated, tmp_path / "missing.sqlite3"):
        assert refused(cli(store, "restore", bad), str(bad)), bad
    assert not store.exists()


def test_a_restore_served_by_another_model_is_reembedded(served_backup, tiny_model, tmp_path):
    import onnx

    backup_file, before, _ = served_backup
    model = onnx.load(str(tiny_model[1]))
    onnx.helper.set_model_props(
        model, {**{p.key: p.value for p in model.metadata_props}, "backup_test": "another file"}
    )
    other = tmp_path / "other.onnx"
    onnx.save(model, str(other))
    other_fingerprint = hashlib.sha256(other.read_bytes()).hexdigest()
    store = tmp_path / "restored.sqlite3"
    assert cli(store, "restore", backup_file).returncode == 0
    with ServiceProcess(other, store) as server, server.client() as client:
        assert client.get("/readyz").json()["model_fingerprint"] == other_fingerprint
        first = [answer[0] for answer in gallery_state(client)["answers"]]
        assert [m[0] for m in first] == [answer[0][0] for answer in before["answers"]]
        assert "re-embedded" in server.output()
    stored = sqlite3.connect(store).execute("SELECT value FROM meta WHERE key = 'model_fingerprint'").fetchone()[0]
    assert stored == other_fingerprint
