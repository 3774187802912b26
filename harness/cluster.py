"""Real servers for the cluster backend's tests and benchmarks: PostgreSQL (Debian's ``postgresql``, which ``make test``
installs) and Milvus through ``milvus-lite``'s gRPC server, each started in a temporary folder and stopped
after. ``unavailable()`` says why they cannot run here, for the tests to skip with."""

import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

from harness.server import free_port

POSTGRES_USER = "postgres"  # PostgreSQL refuses to run as root: as root the server runs as this user


def postgres_bin() -> Optional[Path]:
    """The folder of initdb and postgres: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def unavailable() -> Optional[str]:
    for module in ("psycopg", "pymilvus", "milvus_lite"):
        if importlib.util.find_spec(module) is None:
            return f"the cluster backend's packages are not installed ({module}): pip install -e '.[cluster]'"
    if postgres_bin() is None:
        return "PostgreSQL's server is not installed (make test installs Debian's postgresql where apt-get can)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(POSTGRES_USER)
        except KeyError:
            return f"running as root, and there is no '{POSTGRES_USER}' user to run PostgreSQL as"
    return None


def as_server_user(command: List[str]) -> List[str]:
    return ["runuser", "-u", POSTGRES_USER, "--", *command] if os.geteuid() == 0 else command


def wait_until(ready, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready in {timeout} s")


class LoopbackServer:
    """A server process on loopback, its output in ``folder/<name>.log``: launched, then waited for until it
    accepts a client (``accepts``), failing with its log if it exits first."""

    name: str
    folder: Path
    process: Optional[subprocess.Popen] = None

    def launch(self, command: List[str]) -> None:
        self.log = open(self.folder / f"{self.name}.log", "ab")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(self._ready, self.name)

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.process.returncode}: {(self.folder / f'{self.name}.log').read_text()}"
            )
        return self.accepts()

    def accepts(self) -> bool:
        raise NotImplementedError


class PostgresServer(LoopbackServer):
    """One PostgreSQL server on loopback, trust authentication, data in a temporary folder of its own (pytest's
    are private to root, and the server runs as another user)."""

    name = "postgres"

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="reid-postgres-"))
        self.data = self.folder / "pgdata"
        self.port = free_port()

    def start(self) -> "PostgresServer":
        if os.geteuid() == 0:
            user = pwd.getpwnam(POSTGRES_USER)
            os.chown(self.folder, user.pw_uid, user.pw_gid)
        binaries = postgres_bin()
        if not (self.data / "PG_VERSION").exists():
            subprocess.run(
                as_server_user(
                    [
                        str(binaries / "initdb"),
                        "-D",
                        str(self.data),
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "-E",
                        "UTF8",
                        "--no-sync",
                    ]
                ),
                check=True,
                capture_output=True,
            )
        self.launch(
            as_server_user(
                [
                    str(binaries / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-h",
                    "127.0.0.1",
                    "-k",
                    str(self.folder),
                    "-c",
                    "fsync=off",
                ]
            )
        )
        return self

    def accepts(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.dsn("postgres"), connect_timeout=1).close()
            return True
        except psycopg.OperationalError:
            return False

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def halt(self) -> None:
        """Stop the server and keep its data: ``start`` brings it back on the same port."""
        if self.process and self.process.poll() is None:
            # a fast shutdown (clients' open connections closed), through pg_ctl: as root the server runs under
            # runuser, which does not pass SIGINT on
            subprocess.run(
                as_server_user([str(postgres_bin() / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w"]),
                check=True,
                capture_output=True,
            )
            self.process.wait(30)
        self.log.close()

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def milvus_connection(uri: str, **kwargs):
    """A Milvus client of its own, with the service's connection options, closed on leaving: pymilvus keeps a
    shared connection open after ``close``, pinging, for the rest of the test session."""
    from service.milvus_index import milvus_client

    client = milvus_client(uri, dedicated=True, **kwargs)
    try:
        yield client
    finally:
        client.close()


class MilvusServer(LoopbackServer):
    """milvus-lite's gRPC server (the real engine, embedded in a Python process) on loopback."""

    name = "milvus"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> "MilvusServer":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.launch(
            [
                sys.executable,
                "-m",
                "milvus_lite",
                "server",
                "--data-dir",
                str(self.folder / "data"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ]
        )
        return self

    def accepts(self) -> bool:
        try:
            with milvus_connection(self.uri, timeout=1):
                return True
        except Exception:  # pymilvus raises its own and gRPC's errors while the port is not yet open
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self.log.close()


class ClusterServers:
    """PostgreSQL and milvus-lite for one test session; each gallery gets its own database and collection."""

    def __init__(self):
        self.postgres = PostgresServer()
        self.milvus = MilvusServer(self.postgres.folder / "milvus")
        self.galleries = 0

    def start(self) -> "ClusterServers":
        self.postgres.start()
        self.milvus.start()
        return self

    def stop(self) -> None:
        self.milvus.stop()
        self.postgres.stop()  # and removes the folder, Milvus' data included

    def new_gallery(self) -> dict:
        """Service settings (ServiceProcess keyword arguments) for a fresh, empty cluster gallery."""
        self.galleries += 1
        name = f"gallery_{self.galleries}"
        return {
            "gallery_backend": "cluster",
            "postgres_dsn": self.postgres.new_database(name),
            "milvus_uri": self.milvus.uri,
            "milvus_collection": name,
        }
