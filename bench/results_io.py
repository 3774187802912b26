"""What the benchmarks share: latency percentiles and writing a result file."""
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional


def latency_quantiles(times_ms: List[float], digits: int = 1) -> Dict[str, float]:
    q = statistics.quantiles(times_ms, n=100, method="inclusive")
    return {"p50_ms": round(q[49], digits), "p95_ms": round(q[94], digits), "p99_ms": round(q[98], digits), "queries": len(times_ms)}


def emit(results: dict, output: Optional[Path]) -> None:
    """Print the results as JSON, and write them to ``output`` when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if output:
        output.write_text(text + "\n")
