"""benchmarks/bench_gpu.py runs end to end on the CPU with a tiny config, so it is known to work before any GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def test_gpu_benchmark_runs_on_the_cpu_with_a_tiny_config(tmp_path):
    result_file = tmp_path / "rows.json"
    args = [
        "--tiny", "--device", "cpu", "--backends", "sdpa", "--repeats", "1", "--views", "2", "--side", "56",
        "--max-views", "8", "--fit-seconds", "5", "--context", "32", "--decode-steps", "4", "--json", str(result_file),
        "--frames", "3", "5", "--frame-width", "56", "--frame-height", "42", "--chunk-size", "3", "--overlap", "1",
    ]  # fmt: skip
    run = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(result_file.read_text())
    names = [row["row"] for row in rows]
    assert names == [
        "reconstruction, 2 views 56x56",
        "largest view count that fits (doubling)",
        "prefill, batch 1, 32 tokens",
        "decode, batch 1, after 32 tokens",
        "prefill, batch 8, 32 tokens",
        "decode, batch 8, after 32 tokens",
        "3 frames 56x42, one pass",
        "3 frames 56x42, chunks of 3/1",
        "5 frames 56x42, one pass",
        "5 frames 56x42, chunks of 3/1",
    ]
    assert rows[1]["value"] >= 2  # the 2-view scene fits, and the search doubled from there
    for row in rows:
        assert row["value"] > 0 and math.isfinite(row["value"])
        assert row["unit"] == "views" or (row["floor"] > 0 and math.isfinite(row["floor"]))
    assert "reconstruction, 2 views 56x56" in run.stdout  # the printed table
