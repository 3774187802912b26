"""What the benchmarks share: synthetic images and galleries, a process's memory, throughput and latency
percentiles, and writing a result file (where it came from: ``model_zoo.provenance``, which training shares)."""

import io
import json
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
from PIL import Image

from service.gallery import EMBEDDING_DIM_KEY
from service.store import FINGERPRINT_KEY, GalleryStore

RESULTS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "results.md"  # the page the result tables go on


def jpeg(seed: int, size=(64, 160)) -> bytes:
    """A JPEG of random colour blocks, ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    pixels = np.repeat(np.repeat(rng.integers(0, 256, (8, 4, 3), dtype=np.uint8), size[1] // 8, 0), size[0] // 4, 1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def synthetic_store(path: Path, fingerprint: str, dim: int) -> GalleryStore:
    """The service's own store for a gallery filled through it, marked as embedded by the model with this
    fingerprint, so a server on that model takes it as it is."""
    store = GalleryStore(path)
    store.set_meta({FINGERPRINT_KEY: fingerprint, EMBEDDING_DIM_KEY: str(dim)})
    return store


def memory_kb(pid: int, field: str) -> int:
    """A field of /proc/PID/status in kB: VmHWM (peak resident set), VmRSS, ..."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rate(call: Callable[[], object], images: int, seconds: float) -> float:
    """Images/s of ``call`` (``images`` per call), repeated for ``seconds`` after one warm-up call."""
    call()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        done += images
    return done / (time.perf_counter() - start)


def timed(step: Callable[[], object]) -> float:
    """Milliseconds one call of ``step`` takes."""
    started = time.perf_counter()
    step()
    return (time.perf_counter() - started) * 1000


def alternating_latency(
    variants: Dict[str, Callable[[bytes], object]], queries: List[bytes], rounds: int
) -> Dict[str, Dict[str, float]]:
    """Latency percentiles per variant, the variants alternating query by query in each round, so that a noisy
    machine slows them alike."""
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for query in queries:
            for name, ask in variants.items():
                times[name].append(timed(lambda: ask(query)))
    return {name: latency_quantiles(t) for name, t in times.items()}


def latency_quantiles(times_ms: List[float], digits: int = 1) -> Dict[str, float]:
    q = statistics.quantiles(times_ms, n=100, method="inclusive")
    return {
        "p50_ms": round(q[49], digits),
        "p95_ms": round(q[94], digits),
        "p99_ms": round(q[98], digits),
        "queries": len(times_ms),
    }


def record_end_load(results: dict) -> None:
    """Results made with ``provenance``: the machine's load averages again at the end, beside those at the start."""
    if isinstance(results.get("machine"), dict):
        results["machine"]["load_average_at_end"] = list(os.getloadavg())


def emit(results: dict, output: Optional[Path]) -> None:
    """Print the results as JSON (with ``record_end_load``), and write them to ``output`` when given."""
    record_end_load(results)
    text = json.dumps(results, indent=2)
    print(text)
    if output:
        output.write_text(text + "\n")


def generated_marker(name: str) -> "re.Pattern":
    """A docs marker line ``<!-- NAME: the command that prints it -->`` and the table it owns (the lines that
    start with "|" after it), replaced as a whole by ``rewrite_generated``."""
    return re.compile(rf"^(<!-- {name}: ?[^>]*? -->\n)(?:\n?(?:\|.*\n)+)?", re.M)


def rewrite_generated(text: str, marker: "re.Pattern", table: str) -> str:
    """``text`` with the table under every ``marker`` printed again as ``table``."""
    return marker.sub(lambda match: match.group(1) + "\n" + table + "\n", text)


@dataclass(frozen=True)
class DocsTable:
    """A table in the docs printed from a result file: the page, the marker above the table, and what prints it.
    A benchmark offers ``--write-docs FILE`` through it, and tests/test_results_tables.py checks each page."""

    doc: Path
    marker: "re.Pattern"
    table: Callable[[dict], str]

    def add_option(self, parser) -> None:
        parser.add_argument(
            "--write-docs",
            type=Path,
            default=None,
            help=f"rewrite {self.doc.name}'s table from this result file, measure nothing",
        )

    def rendered(self, text: str, results: dict) -> str:
        return rewrite_generated(text, self.marker, self.table(results))

    def write(self, result_file: Path) -> None:
        self.doc.write_text(self.rendered(self.doc.read_text(), json.loads(result_file.read_text())))


class DocsTables(dict):
    """Several result files of one benchmark, each with its own table on a docs page: result file name ->
    DocsTable. ``--write-docs FILE`` picks the table by the file's name."""

    def add_option(self, parser) -> None:
        parser.add_argument(
            "--write-docs",
            type=Path,
            default=None,
            help=f"rewrite the docs table of this result file ({', '.join(self)}), measure nothing",
        )

    @classmethod
    def on_page(cls, doc: Path, table: Callable[[dict], str], markers: Dict[str, str]) -> "DocsTables":
        """Tables on one page printed by one function: result file name -> the name in its marker."""
        return cls({name: DocsTable(doc, generated_marker(marker), table) for name, marker in markers.items()})

    def write(self, result_file: Path) -> None:
        self[result_file.name].write(result_file)
