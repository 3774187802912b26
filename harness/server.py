"""A real uvicorn server (``python -m service``) on loopback, as users run it: for the tests and the benchmarks."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import httpx

REPO = Path(__file__).resolve().parents[1]
SERVICE_ARGS = ["-m", "service"]  # python -m service: what `make serve` and the Docker images run too


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    def __init__(self, model: Path, store: Path, **settings):
        self.port = free_port()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "REID_MODEL_PATH": str(model),
            "REID_STORE_PATH": str(store),
            "REID_PORT": str(self.port),
            "REID_HOST": "127.0.0.1",
            "REID_INTRA_OP_THREADS": "1",
            **{f"REID_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Optional[subprocess.Popen] = None
        self.log_path = Path(store).with_suffix(f".{self.port}.log")

    def start(self, timeout: float = 60) -> "ServiceProcess":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, *SERVICE_ARGS], env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready in {timeout}s")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, headers: Optional[Dict[str, str]] = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, headers=headers)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def enrol(client: httpx.Client, blobs: List[bytes], **fields) -> List[int]:
    """The ids of ``blobs`` enrolled in one request; ``fields``: its form fields (person_id="7", ...)."""
    response = client.post(
        "/gallery", files=[("images", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)], data=fields
    )
    assert response.status_code == 201, response.text
    return response.json()["ids"]


def metric(client: httpx.Client, sample: str) -> float:
    """One sample's value from /metrics (``name`` or ``name{labels}``), 0 when absent."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def query(client: httpx.Client, blob: bytes, **fields) -> httpx.Response:
    return client.post(
        "/query",
        files={"image": ("q.jpg", blob, "image/jpeg")},
        data={k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()},
    )
