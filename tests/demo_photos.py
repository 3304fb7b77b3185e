"""Realistic inputs for the demo's tests: textured 640x480 "photos" (gradients, noise and shapes, different per
index; made by `demo/benchmark_memory.py`), and a copy of the tiny checkpoint that keeps more of them than the
112-pixel test copy (geometry views 252 pixels wide: 20 photos give about a million points, over the page's cap)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "demo" / "benchmark_memory.py"
_spec = importlib.util.spec_from_file_location("g2vlm_demo_benchmark", BENCHMARK)
_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_benchmark)
textured = _benchmark.textured


def photos(folder: Path, count: int, size: tuple[int, int] = (640, 480), suffix: str = "jpg") -> list[str]:
    """`count` textured photos written to `folder` (JPEG by default, as cameras write them)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"photo_{index:03d}.{suffix}"
        textured(index, *size).save(path, quality=90)
        paths.append(str(path))
    return paths


def realistic_copy(converted: Path, destination: Path, width: int = 252) -> Path:
    """A copy of the converted tiny checkpoint whose geometry views are `width` pixels wide (semantic images 112)."""
    shutil.copytree(converted, destination)
    config_file = destination / "processor_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.get("geometry_image_processor", config["image_processor"])["target_width"] = width
    config["semantic_image_size"] = 112
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return destination
