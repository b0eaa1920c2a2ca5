"""The GPU check's script (benchmarks/gpu_check.py) runs its CPU part here, so it cannot rot between GPU runs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_check_runs_its_cpu_part_without_a_gpu(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path)  # from any folder
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "no CUDA device" in run.stdout
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not [k for k in results if k.startswith("error")], results
    for key in ("crf_loss_fwd_bwd_ms", "crf_cpu_lattice_ms", "inference_ss_images_per_s",
                "inference_ms_flip_crf_images_per_s", "loader_images_per_s_per_process", "smoke_s_per_iteration"):
        assert results[key] > 0, key
    for precision in ("fp32", "bf16"):
        stages = results[f"train_step_{precision}"]["stages_ms"]
        assert {"multi_scale_cam", "forward", "backward", "par", "reg_loss", "optimizer", "ema"} <= set(stages)
        named = sum(v for k, v in stages.items() if k not in ("total", "other"))
        assert named <= stages["total"] * 1.001
    assert results["smoke_iterations"] == 4
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| inference_ms_flip_images_per_s |" in table and "## Training step, bf16" in table
