"""benchmarks/gpu_check.py runs every section end to end on the CPU (`--tiny`), so the one GPU call it is made for is
known to work before it; benchmarks/costs.py's per-stage counts match the FLOPs torch counts on the model's modules."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import StoppingCriteria, StoppingCriteriaList

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_gpu  # noqa: E402
import profile_stages  # noqa: E402
from costs import head_costs, stage_costs  # noqa: E402

from g2vlm_hf import G2VLMForConditionalGeneration  # noqa: E402

SECTIONS = ["env", "tiny", "agree", "stages", "bench", "decode", "lora"]


def numbers_in(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [number for item in value.values() for number in numbers_in(item)]
    if isinstance(value, list):
        return [number for item in value for number in numbers_in(item)]
    return []


def run_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--tiny", "--out", str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_tiny_dry_run_records_every_section_with_numbers_or_a_reason(tmp_path):
    run = run_check(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    for section in SECTIONS:
        assert data.get(section), f"section {section} recorded nothing"
        for key, value in data[section].items():
            assert not (isinstance(value, dict) and "failed" in value), f"{section} / {key}: {value}"
            if section != "env":  # env holds versions and names; the measurements hold numbers or a reason
                skipped = isinstance(value, dict) and value.get("skipped")
                assert skipped or numbers_in(value), f"{section} / {key}: {value}"
    assert set(data["time"]) == set(SECTIONS)
    assert data["env"]["versions"]["torch"] == torch.__version__
    assert all(value > 0 for value in data["env"]["peaks"].values())
    assert data["env"]["attention implementations (accepted -> resolved)"]["sdpa"] == "sdpa"

    # what the GPU run is for, measured here on the CPU with the tiny config
    # (the "eager float32" row compares eager on the CPU with itself here: only the other rows compare two paths)
    assert data["tiny"]["sdpa float32"]["logits_max_abs_diff"] < 1e-4
    assert data["tiny"]["sdpa float32"]["greedy_tokens_equal"] is True  # sdpa's generate() against eager's
    assert data["agree"]["eager float32 (reference)"]["finite"] is True
    assert data["agree"]["float32 sdpa"]["logits_rel"] < 1e-5
    assert 1e-4 < data["agree"]["bfloat16 sdpa"]["world_points_rel"] < 0.1  # bf16 against the float32 reference
    assert "CUDA" in data["agree"]["float32 torch_varlen"]["skipped"]
    assert data["bench"]["flex_attention | other prompt shapes first"]["skipped"].startswith("--tiny")
    sdpa_rows = {key: value for key, value in data["bench"].items() if key.startswith("sdpa |")}
    assert len(sdpa_rows) == 4  # 2 views TF32 on / off, frames in one pass, frames in chunks
    for value in sdpa_rows.values():
        seconds = value.get("seconds", value.get("seconds (one call, kernels warm)"))
        assert seconds > 0 and value["floor_s"] > 0 and value["stage_floor_s"] > 0
    stages = data["stages"]["reconstruction, 2 views 56x56, TF32 on"]
    for stage in ("geometry encoder", "trunk", "point head", "camera head", "global points head", "confidence head"):
        assert stage in stages and stages[stage]["seconds"] > 0 and stages[stage]["floor"] > 0
    assert stages["intrinsics"]["seconds"] > 0 and stages["total"]["seconds"] > 0
    # the attention kernels on the block of the 2 views: 2 x (4 x 4 patches + 2 markers) tokens at the tiny widths
    kernels = data["stages"]["attention kernels, the block of 2 views 56x56"]
    assert kernels["shape"]["tokens"] == 36
    assert kernels["sdpa flash"]["tflops"] > 0 and kernels["sdpa flash"]["reference"] is True
    assert kernels["sdpa math"]["rel_diff"] < 1e-5  # the CPU's flash kernel equals the math backend in float32
    assert "CUDA" in kernels["sdpa cuDNN"]["skipped"]
    assert "semantic encoder" in data["stages"]["chat prefill, 2 views 56x56 + one 56px image, TF32 on"]
    trunk = data["stages"]["trunk by operator, 2 views 56x56"]
    assert {"matmul", "attention", "copies", "element-wise"} <= set(trunk["by_kind_ms"])
    assert math.isclose(sum(trunk["by_kind_ms"].values()), trunk["busy_ms"], rel_tol=1e-3)
    assert trunk["top"][0]["ms"] >= trunk["top"][-1]["ms"] > 0 and "trunk by operator" in run.stdout
    parts = data["decode"].pop("batch 1, default settings, one step by parts (decode_steps.py)")
    assert parts["steps"] == 8 and parts["wall_ms"] > 0 and parts["host_reads"] >= 1  # 9 new tokens
    assert "decode step" in run.stdout
    for key, value in data["decode"].items():
        assert value["tok_per_s"] > 0 and value["floor_tok_per_s"] > 0, key
    lora = data["lora"]["step, bf16 autocast"]
    assert lora["loss_finite"] and lora["grads_finite"] and lora["with_nonzero_grad"] > 0
    assert "sdpa | reconstruction, 2 views 56x56, TF32 on" in run.stdout  # the table, printed last
    assert run.stdout.rstrip().splitlines()[-1].startswith("section seconds:")


def test_decode_steps_counts_each_host_read_of_a_step():
    """A stopping criterion that reads one more device value per step shows as exactly one more host read per step."""
    import decode_steps

    config = profile_stages.config_for("tiny")
    model = bench_gpu.build_model(config, torch.device("cpu"), torch.float32, "sdpa")
    ids = torch.randint(3, bench_gpu.plain_text_ids(config), (1, 16), generator=torch.Generator().manual_seed(0))

    class ReadsLastToken(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            input_ids[:, -1].max().item()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    plain = decode_steps.decode_steps(model, ids, 6)
    reading = decode_steps.decode_steps(model, ids, 6, stopping_criteria=StoppingCriteriaList([ReadsLastToken()]))
    assert plain["steps"] == reading["steps"] == 5
    assert reading["host_reads"] == plain["host_reads"] + 1
    assert plain["wall_ms"] > 0 and plain["device_busy_ms"] is None  # no device timeline on the CPU


def test_one_section_alone_exits_cleanly(tmp_path):
    # the budget's watchdog thread held the models; released by that thread at interpreter exit, it aborted the run
    run = run_check(tmp_path, "--sections", "stages")
    assert run.returncode == 0, run.stderr[-3000:]


def test_a_spent_budget_still_leaves_the_json_with_reasons(tmp_path):
    run = run_check(tmp_path, "--budget", "1", "--sections", "env", "bench")
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["bench"]["section"]["skipped"] == "the whole budget is spent"
    assert not (tmp_path / "gpu_check.json.tmp").exists()


@pytest.mark.parametrize("side", [56, 112])
def test_stage_costs_match_the_flops_torch_counts_per_module(side):
    config = profile_stages.config_for("tiny")
    torch.manual_seed(0)
    model = G2VLMForConditionalGeneration(config).eval()
    views = 2
    inputs = bench_gpu.PromptProcessor(config)([torch.randn(3, side, side) for _ in range(views)])
    # the math attention is plain matrix products, which the counter counts (the fused CPU kernels it does not)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.reconstruct(**inputs)
    counts = {name: sum(values.values()) for name, values in counter.get_flop_counts().items()}
    modules = {
        "geometry encoder": ["G2VLMModel.geometry_encoder", "G2VLMModel.geometry_projector"],
        "trunk": ["G2VLMModel.language_model"],
        "point head": ["G2VLMGeometryHeads.point_decoder", "G2VLMGeometryHeads.point_head"],
        "camera head": ["G2VLMGeometryHeads.camera_decoder", "G2VLMGeometryHeads.camera_head"],
        "global points head": ["G2VLMGeometryHeads.global_points_decoder", "G2VLMGeometryHeads.global_point_head"],
        "confidence head": ["G2VLMGeometryHeads.confidence_decoder", "G2VLMGeometryHeads.confidence_head"],
    }
    costs = {stage.name: stage for stage in stage_costs(config, views, side, side, prompt_tokens=5)}
    assert set(costs) == set(modules)
    for stage, names in modules.items():
        counted = sum(counts[name] for name in names)
        assert math.isclose(costs[stage].flops, counted, rel_tol=1e-3), (stage, costs[stage].flops, counted)


def test_head_weights_match_the_modules():
    config = profile_stages.config_for("tiny")
    heads = G2VLMForConditionalGeneration(config).geometry_heads
    weights = {name: head.weights for name, head in head_costs(config, views=1, patches=16, pixels=16 * 196).items()}
    parts = {
        "point head": (heads.point_decoder, heads.point_head),
        "camera head": (heads.camera_decoder, heads.camera_head),
        "global points head": (heads.global_points_decoder, heads.global_point_head),
        "confidence head": (heads.confidence_decoder, heads.confidence_head),
    }
    for name, modules in parts.items():
        # matrices only: biases, norms and layer scales are left out of the count
        matrices = sum(p.numel() for module in modules for p in module.parameters() if p.ndim == 2)
        assert weights[name] == matrices, name
