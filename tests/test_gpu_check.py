"""The GPU check (benchmarks/gpu_check.py) runs its CPU variants here, so it cannot rot while no GPU is at hand;
its kit (benchmarks/gpu_kit.py) picks what the GPU image lacks and a lymphoma subset that keeps every case."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_kit  # noqa: E402

WEIGHTS = Path(os.environ.get("HISTOFLOW_WEIGHTS", REPO.parent / "shared" / "weights"))


def cases_of(table: Path) -> dict[str, set[str]]:
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    cases: dict[str, set[str]] = {}
    for row in rows:
        cases.setdefault(row["label"], set()).add(row["group"])
    return cases


def test_kit_subset_keeps_every_case_and_only_its_rows(lymphoma_dir: Path, tmp_path: Path) -> None:
    count = gpu_kit.lymphoma_subset(lymphoma_dir, tmp_path, per_class=10)
    with (tmp_path / "cases.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert count == len(rows) == 30
    assert all((tmp_path / row["image"]).is_file() for row in rows)
    assert (sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
            == sorted(r["image"] for r in rows))
    assert cases_of(tmp_path / "cases.csv") == cases_of(lymphoma_dir / "cases.csv")  # 8-9 cases a class, all kept


def test_kit_carries_what_the_gpu_image_lacks_and_nothing_it_has() -> None:
    missing = {gpu_kit.normal(name) for name in gpu_kit.missing_distributions()}
    assert {"hydra-core", "omegaconf", "antlr4-python3-runtime", "webdataset", "wandb", "imagecodecs"} <= missing
    image = {gpu_kit.normal(n) for n in gpu_kit.IMAGE_PACKAGES.read_text().split("\n") if n and not n.startswith("#")}
    assert {"torch", "numpy", "pytorch-lightning", "timm"} <= image
    assert not missing & image


@pytest.mark.slow
def test_gpu_check_runs_its_cpu_variants(lymphoma_dir: Path, wsi_dir: Path, tmp_path: Path) -> None:
    """Every stage of the check on the CPU with tiny budgets: training (both nets and both precisions, AlexNet32 in
    fp32 and ResNet-18 in bf16, the GPU trainer's config on the CPU, DDP with one process) whose loss falls and logs
    no NaN, and the four benchmarks."""
    if not (WEIGHTS / gpu_kit.WEIGHTS).is_file():
        pytest.skip(f"real pretrained weights {WEIGHTS / gpu_kit.WEIGHTS} are absent (see ../shared/weights/README.md)")
    data = tmp_path / "kit"
    gpu_kit.lymphoma_subset(lymphoma_dir, data / "lymphoma", per_class=5)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(out),
                          "--data", str(data), "--weights", str(WEIGHTS), "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["passed"] and not result["cuda"] and not result["failed_stages"]
    stages = {s["name"]: s for s in result["stages"]}
    trained = [n for n in stages if n.startswith(("train_", "ddp_"))]
    assert sorted(trained) == ["ddp_alexnet32_bf16", "train_alexnet32_fp32", "train_resnet18_bf16"]
    for name in trained:
        checks = dict(stages[name]["checks"])
        assert all(checks.values()), (name, checks)
        losses = stages[name]["figures"]["epoch_losses"]
        assert losses[-1] < losses[0]
    assert stages["ddp_alexnet32_bf16"]["figures"]["trainer"] == "ddp"
    for name, key in (("bench_train_fp32", "end_to_end_patches_per_s"), ("bench_train_bf16", "step_patches_per_s"),
                      ("bench_predict", "predict_patches_per_s"), ("bench_embed", "embed_patches_per_s")):
        assert stages[name]["figures"][key] > 0, name
    assert stages["bench_wsi"]["figures"]["runs"]
    assert all(f["holds"] == "not judged (CPU)" for f in result["floors"])
    summary = (out / "gpu_check.md").read_text()
    assert "Result: PASSED" in summary and "| train_resnet18_bf16 | yes |" in summary
    log = (out / "gpu_check.log").read_text()
    assert "CPU variants" in log and "LeafSpec" not in log  # Lightning's deprecation notice, twice a run before


def test_gpu_check_reports_what_it_could_not_run(lymphoma_dir: Path, tmp_path: Path) -> None:
    """A spent budget skips every stage: the check says so in its summary and fails, it does not pass empty."""
    data = tmp_path / "kit"
    gpu_kit.lymphoma_subset(lymphoma_dir, data / "lymphoma", per_class=1)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--budget-s", "0",
                          "--out", str(out), "--data", str(data), "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1
    result = json.loads((out / "gpu_check.json").read_text())
    assert not result["passed"] and all(s["skipped"] for s in result["stages"])
    assert "| environment | skipped |" in (out / "gpu_check.md").read_text()
