"""benchmarks/bench_chunked.py (the README's one-pass memory table) runs end to end, with the eager attention too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_chunked.py"


def test_one_pass_rows_with_the_eager_attention(tmp_path):
    rows_file = tmp_path / "rows.json"
    args = ["--modes", "one_pass", "streamed", "--attention", "eager", "--views", "3", "--side", "28",
            "--chunk-size", "2", "--overlap", "1", "--json", str(rows_file)]  # fmt: skip
    run = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "tiny config, eager attention, 28x28 views" in run.stdout
    rows = json.loads(rows_file.read_text())
    assert [row["views"] for row in rows] == [3] * len(rows) and rows[0]["dtype"] == "float32"
    for row in rows:
        for mode in ("one_pass", "streamed"):
            assert row[mode]["status"] == "ok", row[mode]
            assert row[mode]["seconds"] > 0 and row[mode]["peak_rss_gib"] > 0
            assert row[mode]["attention"] == "eager"
