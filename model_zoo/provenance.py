"""Where a result came from, recorded by whatever makes one (benchmarks, training runs): the commit, the command
line as anyone would type it in a clone, the date, the machine, and fingerprints of the data it read. Paths
under the folders named by the environment's ``DATA`` and ``RUNS`` are written as ``$DATA/...`` and
``$RUNS/...``, paths in the clone relative to it: a result file names no folder of the machine it was made on.

Torch-free (standard library only), so the service's benchmarks and training share it."""

import datetime
import hashlib
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[1]


# Folders a command may name, each from the environment variable of that name: the data, the run folders, and
# public weights (the Makefile's WEIGHTS); a path under one is written from the variable.
PORTABLE_ROOTS = ("DATA", "RUNS", "WEIGHTS")


def portable_path(arg: str) -> str:
    """An absolute path under a ``PORTABLE_ROOTS`` folder or the clone, written as anyone would type it; any other
    string unchanged."""
    if not arg.startswith("/"):
        return arg
    roots = [(Path(os.environ[name]).resolve(), f"${name}") for name in PORTABLE_ROOTS if os.environ.get(name)]
    for root, name in [*roots, (REPO, ".")]:
        if Path(arg).resolve().is_relative_to(root):
            relative = Path(arg).resolve().relative_to(root).as_posix()
            return relative if name == "." else f"{name}/{relative}".rstrip("/.")
    return arg


def portable_command(argv: List[str]) -> str:
    """The command line as anyone would type it in a clone: ``python -m bench.NAME`` for a benchmark,
    ``python -m PACKAGE`` for a package's ``__main__`` (``python -m training train ...``), paths portable."""
    script = Path(argv[0])
    if script.stem == "__main__":
        head = f"python -m {script.parent.name}"
    elif script.parent.name == "bench":
        head = f"python -m bench.{script.stem}"
    else:
        head = portable_path(argv[0])
    return " ".join([head, *(shell_word(portable_argument(arg)) for arg in argv[1:])])


def shell_word(arg: str) -> str:
    """``arg`` as one shell word: double-quoted where it holds a space or a character the shell reads (so
    ``$DATA`` still expands), as it was typed."""
    if arg and not SHELL_SPECIAL.search(arg):
        return arg
    return '"' + re.sub(r'(["\\`])', r"\\\1", arg) + '"'


SHELL_SPECIAL = re.compile(r"[\s\"'`\\|&;<>()*?!#~{}\[\]]")


def portable_argument(arg: str) -> str:
    """``portable_path`` of an argument, and of each path in a ``key=value`` override (``model.pretrained=/...``,
    ``data.roots=[/a,/b]``), so a training command names no folder of this machine either."""
    key, equals, value = arg.partition("=")
    if arg.startswith("/") or not equals:
        return portable_path(arg)
    if value.startswith("[") and value.endswith("]"):
        return f"{key}=[{','.join(portable_path(item.strip()) for item in value[1:-1].split(','))}]"
    return f"{key}={portable_path(value)}"


CPUINFO = Path("/proc/cpuinfo")
# The vector instructions that change a figure: speed, and the int8 and bf16 kernels (so their rounding) that
# ONNX Runtime and PyTorch pick. Two CPUs of one model name ("AMD EPYC") can differ in them.
VECTOR_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpuinfo_field(key: str, cpuinfo: Path = CPUINFO) -> str:
    """The value of the first ``key`` line of Linux's CPU description ('' where there is none)."""
    try:
        lines = cpuinfo.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), "")


def cpu_name() -> str:
    """The CPU's model name (x86 Linux), else what ``platform`` knows of it."""
    return cpuinfo_field("model name") or f"{platform.processor() or platform.machine()} CPU"


def cpu_features(cpuinfo: Path = CPUINFO) -> List[str]:
    """Which of ``VECTOR_FEATURES`` the CPU has (x86 Linux; empty elsewhere)."""
    flags = cpuinfo_field("flags", cpuinfo).split()
    return [feature for feature in VECTOR_FEATURES if feature in flags]


# A benchmark's own output lands here, in the clone it runs from: a result file written there is not a change
# to the code that measured, so it does not make the commit dirty.
RESULTS_FOLDER = "bench/results"


def described_commit(repo: Path) -> str:
    """The checkout's commit, with ``-dirty`` where a tracked file outside ``RESULTS_FOLDER`` differs from it;
    "unknown" outside git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=repo).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){RESULTS_FOLDER}")
    return f"{commit}-dirty" if changed else commit


def provenance() -> dict:
    """What a result file records about its making: the commit (``-dirty`` where code or docs differ from it; a
    result file written in the clone does not count), the command line, the date, and the machine (CPU model,
    cores, load averages)."""
    return {
        "commit": described_commit(REPO),
        "command": portable_command(sys.argv),
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpu": cpu_name(),
            "cpu_features": cpu_features(),
            "cores": os.cpu_count(),
            "load_average_1_5_15": list(os.getloadavg()),
            "python": platform.python_version(),
        },
    }


def data_fingerprint(root: Path) -> dict:
    """sha256 over the sorted names and sizes of the test split's files: changes when the set does."""
    digest, count = hashlib.sha256(), 0
    for split in ("query", "bounding_box_test"):
        for path in sorted((Path(root) / split).iterdir()):
            digest.update(f"{split}/{path.name}:{path.stat().st_size}\n".encode())
            count += 1
    return {"files": count, "sha256": digest.hexdigest()}
