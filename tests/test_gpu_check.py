"""The GPU check's script (benchmarks/gpu_check.py) runs its CPU part here, in its quick mode, so it cannot rot
between GPU runs."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_its_cpu_part_without_a_gpu(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.chdir(tmp_path)  # from any folder
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--quick"]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert not [k for k in results if k.startswith("error")], results
    env = results["environment"]
    assert {"python", "torch", "nvcc", "python_h", "shm_free_mib", "missing_optional", "loader_workers"} <= set(env)
    assert env["python_h"] is True and env["loader_workers"] == 0  # no GPU: the loader runs in the main process
    for key in ("crf_loss_fwd_bwd_ms", "crf_cpu_lattice_ms", "inference_ss_fp32_images_per_s",
                "inference_ms_flip_bf16_images_per_s", "inference_ms_flip_crf_bf16_images_per_s",
                "loader_images_per_s_per_process", "smoke_s_per_iteration"):
        assert results[key] > 0, key
    assert any(k.startswith("bilateral_flat_") for k in results)
    for precision in ("fp32", "bf16"):
        stages = results[f"train_step_{precision}"]["stages_ms"]
        assert {"multi_scale_cam", "forward", "backward", "par", "reg_loss", "optimizer", "ema"} <= set(stages)
        named = sum(v for k, v in stages.items() if k not in ("total", "other"))
        assert named <= stages["total"] * 1.001
    assert results["smoke_iterations"] == 4 and results["quick"] is True
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| inference_ms_flip_bf16_images_per_s |" in table and "## Training step, bf16" in table
    assert "## Environment" in table and "| bf16 ViT-B/16 MS+flip at 448, images/s >= 100 |" in table
