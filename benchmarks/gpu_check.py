"""The GPU check: every GPU path of histoflow run once, timed, and summarised in one JSON and one markdown file.

    benchmarks/gpu_check.sh [OUT_DIR]              # on the GPU machine: installs .gpu-kit/wheels, then this
    python benchmarks/gpu_check.py [--out DIR] [--data DIR] [--weights DIR] [--budget-s 450] [--strict]

With CUDA, within --budget-s (stages that would start past it are listed as skipped):
  environment  versions, the device, imports of everything histoflow loads;
  train        train.py on one fold of the lymphoma images: the tutorial's 32-px net and a torchvision ResNet-18,
               each in fp32 and in bf16 mixed precision, trainer=gpu (channels_last, cuDNN benchmark), loader
               workers auto, W&B offline; a short fixed budget (Adagrad at 0.01 so the loss falls within it);
               checked: the loss falls from the first epoch to the last, nothing logged is NaN, a checkpoint and
               a W&B offline run are written;
  ddp          the same through Lightning's DDP strategy with one process on the one GPU (the cluster's path);
  bench_train  loader, training step and end to end (benchmarks/bench_train.py), fp32 and bf16, at a GPU batch;
               end to end as a user trains: the next batch copied on a side stream (data.loader.device_prefetch);
  bench_predict, bench_embed, bench_wsi   whole-image prediction, embedding, slide prediction on the GPU
               (bench_predict: workers ship uint8 windows, crop/normalisation/views on the GPU once per batch; its
               ratio to the pure forward and to the lesser of the forward and the CPU reader; bench_wsi: tiles
               decoded by the CPU reader in loader workers, slide.decode=cpu);
  bench_wsi_decode   the same slides with slide.decode=device: stored JPEG tiles decoded on the GPU (nvJPEG) and cut
               there; its tiles/s against bench_wsi's (device_over_cpu), the decode alone against the CPU reader's,
               and the decoded tiles against the reader's (max grey-level difference, nvJPEG's tolerance).
GPU utilisation and memory are sampled through NVML (nvidia-smi where NVML is missing) during every stage.
Without CUDA it says so and runs the same stages on the CPU with tiny budgets (tests/test_gpu_check.py), floors
not judged. Writes gpu_check.json, gpu_check.md and gpu_check.log into --out (default $OUT, else gpu-check/).
Exit 1 when a stage fails or a check does not hold; with --strict also when a GPU floor is missed.
--data holds lymphoma/ (with cases.csv) and optionally wsi/; --weights the SqueezeNet 1.1 features; both default
to .gpu-kit (benchmarks/gpu_kit.py) where it exists, else ../shared.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
KIT = REPO / ".gpu-kit"


@dataclass(frozen=True)
class Budget:
    """How much each stage runs: the GPU's figures, or the CPU's few steps that keep the check from rotting."""

    train_epochs: int
    train_batches: int
    train_batch: int
    eval_batches: float | int  # validation and test batches of a training run (1.0: all)
    bench_batches: int
    bench_batch: int
    predict_batch: int
    predict_repeat: int
    embed_patches: int
    slide_side: int
    slide_batch: int
    slide_workers: tuple[int, ...]
    # (net, precision) trained by train.py: all four on a GPU; on the CPU each net and each precision once, which
    # keeps both paths from rotting at half the suite's time
    train_variants: tuple[tuple[str, str], ...] = (("alexnet32", "32-true"), ("alexnet32", "bf16-mixed"),
                                                   ("resnet18", "32-true"), ("resnet18", "bf16-mixed"))


# On the GPU the timed runs must be long beside a loader's start (8 workers, ~1 s): 150 batches of 4,096 patches
# an epoch, the kit's 48 images listed 10 times for prediction, a 20,000-px slide (~2,000 tissue tiles).
GPU = Budget(train_epochs=3, train_batches=40, train_batch=256, eval_batches=1.0, bench_batches=150, bench_batch=4096,
             predict_batch=4096, predict_repeat=10, embed_patches=4096, slide_side=20000, slide_batch=128,
             slide_workers=(0, 8))
CPU = Budget(train_epochs=3, train_batches=4, train_batch=16, eval_batches=2, bench_batches=3, bench_batch=32,
             predict_batch=256, predict_repeat=1, embed_patches=16, slide_side=1200, slide_batch=8, slide_workers=(0,),
             train_variants=(("alexnet32", "32-true"), ("resnet18", "bf16-mixed")))

# Floors of issue 28, judged on a GPU only: (figure key, floor, what it says)
FLOORS = [("bench_train_bf16.end_to_end_over_step", 0.9, "end to end >= 0.9 of the training step (bf16)"),
          ("bench_train_fp32.end_to_end_over_step", 0.9, "end to end >= 0.9 of the training step (fp32)"),
          ("bench_train_bf16.step_patches_per_s", 200_000, "32-px net >= 200,000 training patches/s in bf16"),
          # issue 39: the next batch copied to the GPU beside the step (data.loader.device_prefetch, auto: on)
          ("bench_train_bf16.end_to_end_over_step", 0.95, "end to end >= 0.95 of the training step (bf16, issue 39)"),
          ("bench_train_fp32.end_to_end_over_step", 0.95, "end to end >= 0.95 of the training step (fp32, issue 39)"),
          ("bench_predict.predict_over_forward_median", 0.9, "whole-image prediction >= 0.9 of the pure forward"),
          # issue 39: uint8 windows from the workers, the transform on the GPU; >= 0.9 of the lesser of the
          # forward and the CPU reader (read + cut) that the same stage measures
          ("bench_predict.predict_over_ceiling", 0.9, "whole-image prediction >= 0.9 of min(forward, CPU reader)"),
          ("bench_embed.embed_over_forward", 0.8, "embedding >= 0.8 of the encoder's forward"),
          # issue 39: slides with JPEG tiles at half ResNet-18's forward rate at 224 px, decoded on the GPU
          ("bench_wsi_decode.resnet18_slide_over_forward", 0.5,
           "JPEG slides (decode=device) >= 0.5 of ResNet-18's forward")]


class GpuSampler:
    """Samples GPU utilisation (%) and memory used (MiB) every `period` seconds in a thread, through NVML, or
    nvidia-smi where the NVML binding is missing; nothing without a GPU."""

    def __init__(self, period: float = 0.2) -> None:
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._read = self._nvml() or self._smi()
        self.source = getattr(self._read, "source", None)

    @staticmethod
    def _nvml():
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no binding, no driver, no device: fall back
            return None

        def read() -> tuple[float, float]:
            return (pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                    pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2 ** 20)
        read.source = "NVML"
        return read

    @staticmethod
    def _smi():
        if shutil.which("nvidia-smi") is None:
            return None

        def read() -> tuple[float, float]:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,"
                                  "nounits", "-i", "0"], capture_output=True, text=True, timeout=5).stdout
            util, mem = out.strip().split(",")
            return float(util), float(mem)
        read.source = "nvidia-smi"
        return read

    def __enter__(self) -> "GpuSampler":
        if self._read is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.samples.append(self._read())
            except Exception:  # a missed sample is not worth a stage
                pass

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._read is not None:
            self._thread.join()

    def summary(self) -> dict[str, Any] | None:
        if not self.samples:
            return None
        util = [u for u, _ in self.samples]
        return {"util_mean_pct": round(sum(util) / len(util), 1), "util_max_pct": max(util),
                "memory_max_mib": round(max(m for _, m in self.samples)), "samples": len(util), "source": self.source}


@dataclass
class Stage:
    name: str
    ok: bool = True
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[tuple[str, bool]] = field(default_factory=list)
    gpu: dict[str, Any] | None = None
    error: str | None = None
    skipped: bool = False


class Check:
    """Runs the stages in order, within the budget, logging each one's output; a failed stage never stops the rest."""

    def __init__(self, out: Path, work: Path, budget_s: float, env: dict[str, str]) -> None:
        self.out, self.work, self.budget_s, self.env = out, work, budget_s, env
        self.start = time.perf_counter()
        self.stages: list[Stage] = []
        self.log = (out / "gpu_check.log").open("w")

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def stage(self, name: str, work, *args: Any) -> Stage:
        stage = Stage(name)
        self.stages.append(stage)
        if self.left() < 10:
            stage.skipped, stage.ok, stage.error = True, False, "skipped: the check's time budget was spent"
            self.say(f"== {name}: skipped (budget spent)")
            return stage
        self.say(f"== {name} ({self.left():.0f} s of the budget left)")
        t0 = time.perf_counter()
        with GpuSampler() as sampler:
            try:
                work(stage, *args)
            except Exception as e:  # recorded and reported; the next stage still runs
                stage.ok, stage.error = False, f"{type(e).__name__}: {e}"
        stage.seconds, stage.gpu = round(time.perf_counter() - t0, 1), sampler.summary()
        stage.ok = stage.ok and all(ok for _, ok in stage.checks)
        self.say(f"== {name}: {'ok' if stage.ok else 'FAILED'} in {stage.seconds:.1f} s"
                 + (f" ({stage.error})" if stage.error else "")
                 + "".join(f"\n   check {'ok' if ok else 'FAILED'}: {text}" for text, ok in stage.checks))
        return stage

    def run(self, command: list[str], timeout: float | None = None) -> str:
        """Run a command from the repository root, its output into the log; its output, or an error with its tail."""
        timeout = max(10.0, min(timeout or self.left(), self.left()))
        self.say("$ " + " ".join(command))
        try:
            done = subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            self.log.write(output)
            raise RuntimeError(f"timed out after {timeout:.0f} s") from None
        output = done.stdout + done.stderr
        self.log.write(output)
        self.log.flush()
        if done.returncode != 0:
            tail = "\n".join(output.strip().splitlines()[-8:])
            raise RuntimeError(f"exit {done.returncode}: {tail}")
        return output


def environment(stage: Stage, cuda: bool) -> None:
    """Versions of what the GPU runs, and the imports of every module histoflow loads on the way."""
    import importlib
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "torchvision", "pytorch-lightning", "torchmetrics", "timm", "hydra-core", "omegaconf",
                 "webdataset", "wandb", "imagecodecs", "tifffile", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    stage.figures.update(python=platform.python_version(), versions=versions, cpus=os.cpu_count(),
                         cuda=torch.version.cuda if cuda else None)
    if cuda:
        props = torch.cuda.get_device_properties(0)
        stage.figures.update(device=props.name, memory_gib=round(props.total_memory / 2 ** 30, 1),
                             capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                             bf16=torch.cuda.is_bf16_supported())
    failed = []
    for module in ("hydra", "omegaconf", "webdataset", "wandb", "imagecodecs", "tifffile", "torchstain", "cachetools",
                   "histoflow.training.run", "histoflow.deployment.deploy", "histoflow.deployment.slide_map",
                   "histoflow.features.embeddings"):
        try:
            importlib.import_module(module)
        except Exception as e:
            failed.append(f"{module} ({type(e).__name__}: {e})")
    stage.checks.append(("every module imports" + (": " + "; ".join(failed) if failed else ""), not failed))
    stage.figures["wandb_imports"] = not any(f.startswith("wandb ") for f in failed)


def read_metrics(run: Path) -> list[dict[str, str]]:
    (metrics,) = run.glob("csv/version_*/metrics.csv")
    with metrics.open(newline="") as f:
        return list(csv.DictReader(f))


def judge_run(stage: Stage, run: Path) -> None:
    """The checks on a finished training run: loss falls, nothing NaN, a checkpoint."""
    rows = read_metrics(run)
    by_epoch: dict[int, float] = {}
    nan = []
    for row in rows:
        for key, value in row.items():
            if value not in ("", None) and value.lower() in ("nan", "inf", "-inf"):
                nan.append(key)
        if row.get("train/loss_epoch"):
            by_epoch[int(row["epoch"])] = float(row["train/loss_epoch"])
    losses = [by_epoch[e] for e in sorted(by_epoch)]
    test = [float(r["test/acc_macro"]) for r in rows if r.get("test/acc_macro")]
    stage.figures.update(epoch_losses=[round(x, 4) for x in losses], test_acc_macro=test[-1] if test else None)
    stage.checks.append((f"loss falls ({' -> '.join(f'{x:.3f}' for x in losses)})",
                         len(losses) >= 2 and losses[-1] < losses[0]))
    stage.checks.append((f"nothing logged is NaN or infinite{': ' + ', '.join(sorted(set(nan))) if nan else ''}",
                         not nan and all(math.isfinite(x) for x in losses)))
    stage.checks.append(("a checkpoint written", any(run.glob("checkpoints/*.ckpt"))))


def train(stage: Stage, check: Check, budget: Budget, data: Path, cuda: bool, model: str, precision: str,
          trainer: str = "gpu") -> None:
    """One fold of train.py on the lymphoma images with the GPU trainer (its CPU variant without CUDA); with the
    CSV logger alone where wandb does not import (the W&B check then fails, the GPU figures still come)."""
    run = check.work / "runs" / stage.name
    wandb = lookup(check.stages, "environment.wandb_imports") is not False
    overrides = [f"trainer={trainer}", f"trainer.precision={precision}", f"model={model}",
                 f"data.root={data / 'lymphoma'}", f"hydra.run.dir={run}", f"logger={'wandb' if wandb else 'csv'}",
                 "optimizer.lr=0.01",
                 f"trainer.max_epochs={budget.train_epochs}", f"data.loader.epoch_batches={budget.train_batches}",
                 f"data.loader.batch_size={budget.train_batch}", "trainer.log_every_n_steps=1",
                 f"trainer.limit_val_batches={budget.eval_batches}",
                 f"trainer.limit_test_batches={budget.eval_batches}",
                 "callbacks.progress_bar._target_=pytorch_lightning.callbacks.TQDMProgressBar"]
    if trainer == "ddp":
        overrides += ["trainer.devices=1", "trainer.sync_batchnorm=false"]
    if not cuda:
        overrides.append("trainer.accelerator=cpu")
    t0 = time.perf_counter()
    check.run([sys.executable, "train.py", *overrides])
    patches = budget.train_epochs * budget.train_batches * budget.train_batch
    stage.figures.update(model=model, precision=precision, trainer=trainer, batch_size=budget.train_batch,
                         training_patches=patches, process_s=round(time.perf_counter() - t0, 1))
    judge_run(stage, run)
    stage.checks.append(("a W&B offline run written", any(run.glob("wandb/offline-run-*"))))


def bench(stage: Stage, check: Check, script: str, *args: str) -> None:
    """A benchmark script with --json: its figures into the stage."""
    figures = check.work / f"{stage.name}.json"
    check.run([sys.executable, str(BENCH / script), *args, "--json", str(figures)])
    stage.figures.update(json.loads(figures.read_text()))


def wsi_decode(stage: Stage, check: Check, *args: str) -> None:
    """bench_wsi with slide.decode=device, beside bench_wsi's decode=cpu runs; the device's tiles against the
    reader's."""
    bench(stage, check, "bench_wsi.py", *args, "--decode", "device")
    runs = stage.figures.get("runs", [])
    cpu = {(r["slide"], r["backend"], r["model"], r["workers"]): r["slide_tiles_per_s"]
           for s in check.stages if s.name == "bench_wsi" for r in s.figures.get("runs", [])}
    for r in runs:
        base = cpu.get((r["slide"], r["backend"], r["model"], r["workers"]))
        r["device_over_cpu"] = r["slide_tiles_per_s"] / base if base else None
    for model in {r["model"] for r in runs}:
        best = max((r for r in runs if r["model"] == model), key=lambda r: r["slide_tiles_per_s"])
        stage.figures[f"{model}_slide_tiles_per_s"] = best["slide_tiles_per_s"]
        stage.figures[f"{model}_slide_over_forward"] = best["slide_over_forward"]
        if best.get("device_over_cpu"):
            stage.figures[f"{model}_device_over_cpu"] = best["device_over_cpu"]
    rates = [r["device_decode_over_read"] for r in runs if r.get("device_decode_over_read")]
    stage.figures["decode_over_cpu_reader"] = max(rates) if rates else None
    stage.checks.append(("the stored JPEG tiles were decoded on the device", bool(rates)))
    differs = [r["device_decode_max_difference"] for r in runs if r.get("device_decode_max_difference") is not None]
    stage.figures["max_grey_level_difference"] = max(differs) if differs else None
    stage.checks.append((f"device-decoded tiles within 2 grey levels of the CPU reader's (max {max(differs or [-1])})",
                         bool(differs) and max(differs) <= 2))


def lookup(stages: list[Stage], key: str) -> Any:
    name, _, figure = key.partition(".")
    for stage in stages:
        if stage.name == name and stage.ok:
            return stage.figures.get(figure)
    return None


def summary_markdown(result: dict[str, Any]) -> str:
    env = next((s["figures"] for s in result["stages"] if s["name"] == "environment"), {})
    lines = [f"# GPU check, {result['date']}", "",
             f"Device: {env.get('device', 'no CUDA device: CPU variants, tiny budgets, floors not judged')}; "
             f"{env.get('cpus')} CPUs; Python {env.get('python')}; "
             + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v), "",
             f"Result: {'PASSED' if result['passed'] else 'FAILED'} in {result['seconds']:.0f} s.", "",
             "| stage | ok | s | GPU util mean / max % | GPU memory max MiB | figures |",
             "|---|---|---:|---:|---:|---|"]
    for s in result["stages"]:
        gpu = s["gpu"] or {}
        figures = {k: v for k, v in s["figures"].items() if k not in ("versions", "runs")}
        text = ", ".join(f"{k} {v:,.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        status = "skipped" if s["skipped"] else ("yes" if s["ok"] else "**no**")
        lines.append(f"| {s['name']} | {status} | {s['seconds']:.1f} | "
                     f"{gpu.get('util_mean_pct', '-')} / {gpu.get('util_max_pct', '-')} | "
                     f"{gpu.get('memory_max_mib', '-')} | {text}{' ERROR ' + s['error'] if s['error'] else ''} |")
    runs = [r for s in result["stages"] for r in s["figures"].get("runs", [])]
    if runs:
        lines += ["",
                  "| slide | tiles | model | decode | workers | forward tiles/s | slide tiles/s | slide / forward |",
                  "|---|---:|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['slide']} | {r['tiles']} | {r['model']} | {r.get('decode', 'cpu')} | {r['workers']} | "
                  f"{r['forward_tiles_per_s']:,.0f} | {r['slide_tiles_per_s']:,.0f} | {r['slide_over_forward']:.2f} |"
                  for r in runs]
    checks = [(s["name"], text, ok) for s in result["stages"] for text, ok in s["checks"]]
    lines += ["", "| stage | check | holds |", "|---|---|---|"]
    lines += [f"| {name} | {text} | {'yes' if ok else '**no**'} |" for name, text, ok in checks]
    lines += ["", "| floor | value | holds |", "|---|---:|---|"]
    for f in result["floors"]:
        value = "-" if f["value"] is None else f"{f['value']:,.3g}"
        lines.append(f"| {f['text']} | {value} | {f['holds']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = REPO.parent / "shared"
    kit = KIT if (KIT / "data" / "lymphoma").is_dir() else None
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "gpu-check"))
    parser.add_argument("--data", type=Path, default=kit / "data" if kit else shared / "data")
    parser.add_argument("--weights", type=Path, default=kit / "weights" if kit else shared / "weights")
    parser.add_argument("--work", type=Path, default=None, help="prepared data and runs (default: a temporary folder)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="no stage starts past this many seconds")
    parser.add_argument("--cpu", action="store_true", help="the CPU variants even where CUDA is there")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a GPU floor is missed too")
    args = parser.parse_args()
    if not (args.data / "lymphoma").is_dir():
        print(f"{args.data / 'lymphoma'}: not found. Fix: run benchmarks/gpu_kit.py, or pass --data")
        return 2
    import torch  # here, so that --help answers at once

    cuda = torch.cuda.is_available() and not args.cpu
    budget = GPU if cuda else CPU
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="histoflow-gpu-check-"))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HISTOFLOW_WORK": str(work / "data"),
           "HISTOFLOW_LOGS": str(work / "logs"), "HISTOFLOW_CACHE": str(work / "cache"),
           "HISTOFLOW_WEIGHTS": str(args.weights), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    check = Check(args.out, work, args.budget_s, env)
    check.say("CUDA device found: the GPU budgets" if cuda else
              f"{'--cpu' if args.cpu else 'no CUDA device here'}: "
              "the CPU variants with tiny budgets (floors not judged)")
    data, b = args.data, budget
    device = "cuda" if cuda else "cpu"
    check.stage("environment", environment, cuda)
    for model, precision in b.train_variants:
        tag = "fp32" if precision == "32-true" else "bf16"
        check.stage(f"train_{model}_{tag}", train, check, b, data, cuda, model, precision)
    check.stage("ddp_alexnet32_bf16", train, check, b, data, cuda, "alexnet32", "bf16-mixed", "ddp")
    for precision, tag in (("32-true", "fp32"), ("bf16-mixed", "bf16")):
        check.stage(f"bench_train_{tag}", bench, check, "bench_train.py", "--data", str(data), "--out",
                    str(work / "bench-train"), "--batches", str(b.bench_batches), "--batch-size", str(b.bench_batch),
                    "--precision", precision, "--no-png", "--passes", "1", "--device", device)
    check.stage("bench_predict", bench, check, "bench_predict.py", "--data", str(data), "--batch-size",
                str(b.predict_batch), "--repeat", str(b.predict_repeat), "--chunks", "2", "--workers", "auto",
                "--device", device)
    check.stage("bench_embed", bench, check, "bench_embed.py", "--data", str(data), "--out", str(work / "embed"),
                "--patches", str(b.embed_patches), "--no-sweep", "--device", device,
                f"encoder.weights={args.weights / 'squeezenet1_1-imagenet-features.pth'}")
    slide = ["--real", str(data / "wsi")] if (data / "wsi" / "tcga-cr-7395-01a-01-ts1.svs").is_file() else []
    check.stage("bench_wsi", bench, check, "bench_wsi.py", "--side", str(b.slide_side), "--batch", str(b.slide_batch),
                "--workers", *map(str, b.slide_workers), "--repeats", "1", "--device", device, *slide,
                "--backends", "tifffile", "openslide", "--decode", "cpu")  # the kit carries openslide's wheels
    check.stage("bench_wsi_decode", wsi_decode, check, "--side", str(b.slide_side), "--batch", str(b.slide_batch),
                "--workers", *map(str, b.slide_workers), "--repeats", "1", "--device", device,
                "--backends", "tifffile", "openslide")

    stages = [vars(s) for s in check.stages]
    floors = []
    for key, floor, text in FLOORS:
        value = lookup(check.stages, key)
        holds = "not judged (CPU)" if not cuda else ("-" if value is None else ("yes" if value >= floor else "**no**"))
        floors.append({"key": key, "floor": floor, "text": text, "value": value, "holds": holds})
    failed = [s.name for s in check.stages if not s.ok]
    missed = [f["key"] for f in floors if f["holds"] == "**no**"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cuda": cuda,
              "seconds": round(time.perf_counter() - check.start, 1),
              "passed": not failed and not (args.strict and missed),
              "failed_stages": failed, "missed_floors": missed, "stages": stages, "floors": floors}
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    markdown = summary_markdown(result)
    (args.out / "gpu_check.md").write_text(markdown)
    check.say(markdown)
    if work != args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
