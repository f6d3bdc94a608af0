"""GPU check: does every GPU path give what the CPU gives, and how fast is it?

On a CUDA device (`--device cuda`, the default) it compares, on the same real images:
1. extract: the CPU's fp32 tokens against the device's (fp16 autocast, as the stage runs it) with xformers
   attention on and off (when xformers is installed). Tolerance: every token's cosine to its CPU twin
   ≥ 0.999 and the largest absolute difference ≤ 2% of the largest absolute token value (fp16 keeps ~3 digits);
2. k-means: faiss-gpu against faiss-cpu spherical k-means from the same PCA start (share of tokens given the
   same cluster, ≥ 99%, and the mean cosine to the assigned centroid of both);
3. fit: 2 epochs of the real `fit` stage on CUDA against the same on the CPU, from the same caches
   (largest difference of θ_M's effective weights ≤ 1e-3 of their scale, and of the loss histories);
then it times extract (img/s of the stage's forward at a large batch) and a fit epoch on the device against
the two backbone forward passes an online implementation pays per epoch.

`--device cpu` runs every part on the CPU against itself (the kernels the GPU would use are skipped and said
so), which is how the suite tests this script; figures from it are not GPU figures. Prints a table and writes
the figures as JSON with `--json`.

Example (on the GPU machine, ≈ 3 min):
    .venv/bin/python benchmarks/gpu_check.py --device cuda --images 64 --timing-batch 64 --json gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.backbones import build_backbone, get_spec  # noqa: E402
from pipeline.backbones.vit import memory_efficient_attention, set_xformers  # noqa: E402
from pipeline.data import normalize_crops, open_dataset, prepare_crop  # noqa: E402
from pipeline.em.initialisation import faiss_gpus, pca_directions, spherical_kmeans  # noqa: E402
from pipeline.store.checkpoints import load_checkpoint  # noqa: E402
from pipeline.store.features import FeatureFile  # noqa: E402
from pipeline.segmenter import load_segmenter  # noqa: E402
from stages.extract import ExtractSettings, run_extract  # noqa: E402
from pipeline.tokens import sample_tokens  # noqa: E402
from stages.fit import FitSettings, run_fit  # noqa: E402
from stages.propose import ProposeSettings, run_propose  # noqa: E402

BACKBONE = "dinov2_vits14_imgfocus"
DEFAULT_CAMVID = os.environ.get("PRIMAPS_CAMVID_ROOT",
                                str(Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"))
TOKEN_COSINE_MIN = 0.999
TOKEN_ABS_MAX = 0.02
KMEANS_AGREEMENT_MIN = 0.99
FIT_WEIGHT_MAX = 1e-3
SMALL_BASELINE = {"init_samples": 20_000, "kmeans_iterations": 20}
"""A quick Baseline for the timed fits (the recipe keys `init_samples`, `kmeans_iterations`)."""


def token_parity(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """How far `other` tokens are from `reference` (N×g×g×C): worst cosine, mean cosine, largest relative gap."""
    a = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    b = other.reshape(-1, other.shape[-1]).astype(np.float64)
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    relative = float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))
    return {"min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean()), "max_abs_relative": relative,
            "ok": bool(cosine.min() >= TOKEN_COSINE_MIN and relative <= TOKEN_ABS_MAX)}


@torch.inference_mode()
def tokens(model: torch.nn.Module, crops: np.ndarray, device: torch.device, batch: int = 8) -> np.ndarray:
    """The stage's forward (fp16 autocast on CUDA, fp32 on CPU) over uint8 crops."""
    out = []
    for start in range(0, len(crops), batch):
        images = normalize_crops(crops[start:start + batch]).to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            out.append(model(images).float().cpu().numpy())
    return np.concatenate(out)


def check_extract(crops: np.ndarray, device: torch.device) -> dict[str, Any]:
    model, _ = build_backbone(BACKBONE)
    reference = tokens(model, crops, torch.device("cpu"))
    model = model.to(device)
    results: dict[str, Any] = {}
    for name, xformers in (("sdpa", False), ("xformers", True)):
        if xformers and (device.type != "cuda" or memory_efficient_attention is None):
            results[name] = "skipped: needs CUDA and xformers"
            continue
        set_xformers(model, xformers)
        results[name] = token_parity(reference, tokens(model, crops, device))
    set_xformers(model, True)
    return results


def check_kmeans(sample: np.ndarray, classes: int, device: torch.device) -> dict[str, Any]:
    init = pca_directions(sample, classes)
    cpu = spherical_kmeans(sample, init, iterations=20)
    if device.type != "cuda" or faiss_gpus() == 0:
        return {"gpu": "skipped: needs CUDA and faiss-gpu"}
    gpu = spherical_kmeans(sample, init, iterations=20, gpu=True)
    unit = sample / np.linalg.norm(sample, axis=1, keepdims=True)
    assigned_cpu, assigned_gpu = (unit @ cpu.T).argmax(1), (unit @ gpu.T).argmax(1)
    agreement = float((assigned_cpu == assigned_gpu).mean())
    return {"gpu": {"agreement": agreement, "cpu_mean_cosine": float((unit @ cpu.T).max(1).mean()),
                    "gpu_mean_cosine": float((unit @ gpu.T).max(1).mean()), "ok": agreement >= KMEANS_AGREEMENT_MIN}}


def check_fit(train: Path, masks: Path, work: Path, classes: int, device: torch.device) -> dict[str, Any]:
    """The same 2-epoch fit (one shared Baseline, made on the CPU) on the CPU and on the device."""
    runs = {}
    for name, fit_device in (("cpu", "cpu"), ("device", device.type)):
        out = work / f"fit_{name}.pt"
        started = time.perf_counter()
        run_fit(FitSettings(features=train, masks=masks, classes=classes, out=out, baseline_out=work / "baseline.pt",
                            epochs=2, device=fit_device, overrides=SMALL_BASELINE | {"batch_size": 8}),
                progress=False)
        checkpoint = load_checkpoint(out)
        runs[name] = (load_segmenter(checkpoint).prototypes.weight().detach().numpy(), checkpoint["history"],
                      time.perf_counter() - started)
    (cpu_weight, cpu_history, _), (device_weight, device_history, _) = runs["cpu"], runs["device"]
    gap = float(np.abs(cpu_weight - device_weight).max() / np.abs(cpu_weight).max())
    loss_gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(cpu_history, device_history))
    return {"theta_m_max_relative": gap, "loss_max_abs": loss_gap, "ok": gap <= FIT_WEIGHT_MAX}


def time_extract(crops: np.ndarray, device: torch.device, batch: int, repeats: int) -> dict[str, float]:
    model = build_backbone(BACKBONE)[0].to(device)
    batch_crops = np.resize(crops, (batch, *crops.shape[1:]))
    tokens(model, batch_crops, device, batch)
    synchronise(device)
    started = time.perf_counter()
    for _ in range(repeats):
        tokens(model, batch_crops, device, batch)
    synchronise(device)
    seconds = time.perf_counter() - started
    return {"batch": batch, "images_per_second": batch * repeats / seconds}


def time_fit_epoch(train: Path, masks: Path, work: Path, classes: int, device: torch.device,
                   images: int, extract_rate: float) -> dict[str, float]:
    out = work / "fit_timed.pt"
    run_fit(FitSettings(features=train, masks=masks, classes=classes, out=out, epochs=1, device=device.type,
                        overrides=SMALL_BASELINE), progress=False)
    started = time.perf_counter()
    run_fit(FitSettings(features=train, masks=masks, classes=classes, out=work / "fit_timed2.pt",
                        baseline_out=out.with_name("fit_timed.baseline.pt"), epochs=1, device=device.type,
                        overrides=SMALL_BASELINE), progress=False)
    epoch = time.perf_counter() - started
    online = 2 * images / extract_rate
    return {"fit_epoch_seconds": epoch, "two_forward_passes_seconds": online, "ratio": epoch / online}


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--camvid", default=DEFAULT_CAMVID, help="CamVid root (else scikit-image's sample photos)")
    parser.add_argument("--images", type=int, default=32, help="images compared and fitted on")
    parser.add_argument("--resolution", type=int, default=322)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--timing-batch", type=int, default=64)
    parser.add_argument("--timing-repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device (use --device cpu to exercise the script)")
    labelled = Path(args.camvid, "train").is_dir()
    dataset_name, root = ("camvid", args.camvid) if labelled else ("sample", None)
    dataset = open_dataset(dataset_name, root, "train", max_images=args.images)
    crops = np.stack([prepare_crop(dataset.load_image(i), args.resolution) for i in range(len(dataset))])
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "images": len(crops), "dataset": dataset_name}
    report["extract"] = check_extract(crops, device)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        train = work / "train.h5"
        run_extract(ExtractSettings(dataset=dataset_name, root=root, split="train", backbone=BACKBONE, out=train,
                                    resolution=args.resolution, views=2, max_images=args.images, device=args.device),
                    progress=False)
        run_propose(ProposeSettings(features=train, out=work / "masks", workers=min(os.cpu_count() or 1, 16)),
                    progress=False)
        with FeatureFile(train) as features:
            sample = sample_tokens(features, 50_000, seed=0)
        report["kmeans"] = check_kmeans(sample, args.classes, device)
        report["fit"] = check_fit(train, work / "masks", work, args.classes, device)
        report["timing"] = {"extract": time_extract(crops, device, args.timing_batch, args.timing_repeats)}
        report["timing"]["fit"] = time_fit_epoch(train, work / "masks", work, args.classes, device, len(crops),
                                                 report["timing"]["extract"]["images_per_second"])
    print_report(report, get_spec(BACKBONE).name)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_report(report: dict[str, Any], backbone: str) -> None:
    print(f"# GPU check: {report['device']}, torch {report['torch']}, {backbone}, {report['images']} "
          f"{report['dataset']} images")
    print("| check | figures | within tolerance |")
    print("|---|---|---|")
    for kernel, result in report["extract"].items():
        if isinstance(result, str):
            print(f"| extract ({kernel}) | {result} | |")
        else:
            print(f"| extract ({kernel}) vs CPU fp32 | min token cosine {result['min_cosine']:.5f}, mean "
                  f"{result['mean_cosine']:.6f}, max |Δ| {100 * result['max_abs_relative']:.2f}% of max |token| "
                  f"| {result['ok']} |")
    kmeans = report["kmeans"]["gpu"]
    if isinstance(kmeans, str):
        print(f"| k-means faiss-gpu vs faiss-cpu | {kmeans} | |")
    else:
        print(f"| k-means faiss-gpu vs faiss-cpu | same cluster for {100 * kmeans['agreement']:.2f}% of tokens, "
              f"mean cosine {kmeans['gpu_mean_cosine']:.4f} vs {kmeans['cpu_mean_cosine']:.4f} | {kmeans['ok']} |")
    fit = report["fit"]
    print(f"| fit 2 epochs, device vs CPU | θ_M max |Δ| {fit['theta_m_max_relative']:.2e} of scale, loss max |Δ| "
          f"{fit['loss_max_abs']:.2e} | {fit['ok']} |")
    extract, fit_timing = report["timing"]["extract"], report["timing"]["fit"]
    print(f"| extract speed (batch {extract['batch']}) | {extract['images_per_second']:.1f} img/s | |")
    print(f"| fit epoch vs 2 forward passes | {fit_timing['fit_epoch_seconds']:.2f} s vs "
          f"{fit_timing['two_forward_passes_seconds']:.2f} s = 1/{1 / fit_timing['ratio']:.1f} | |")


if __name__ == "__main__":
    main()
