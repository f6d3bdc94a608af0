"""PriMaPs-EM recipe study: fit and evaluate named recipes over several seeds, print Baseline vs EM side by side.

Each recipe is `NAME:key=value,key=value` with `FitSettings` field names (`masks=DIR` picks a mask directory);
every (recipe, seed) pair runs the real `fit` and `evaluate` stages, so the figures are what a user gets. The
Baseline of each seed is scored too; the last columns are EM minus Baseline, averaged over the seeds. The target
is ≥ +5 points of pixel accuracy and ≥ +3 points of mIoU over the Baseline, at the last epoch, θ_M (README, recipe).

Example:
  .venv/bin/python benchmarks/em_study.py --train /work/camvid-cache2/train.h5 --val /work/camvid-cache2/val.h5 \
      --masks /work/camvid-cache2/masks_mean0.8 --classes 11 --seeds 0,1,2 --work /work/em \
      --recipe default: --recipe round1:mask_weighting=0,learning_rate=0.0005 \
      --recipe paper:learning_rate=0.005,min_share=0,teacher_fallback=false,mask_weighting=0,masks=MASKS_PSI04
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from stages.evaluate import EvaluateSettings, run_evaluate
from stages.fit import FitSettings, baseline_path, run_fit


PATH_SETTINGS = ("masks", "head")
"""FitSettings fields a recipe sets to a path: another mask directory, or a segmentation head to fit on."""


def parse_recipe(text: str) -> tuple[str, dict[str, object]]:
    """`NAME:key=value,...` → (NAME, overrides), values typed like the FitSettings field they set."""
    name, _, assignments = text.partition(":")
    fields = {field.name: field for field in dataclasses.fields(FitSettings)}
    overrides: dict[str, object] = {}
    for assignment in filter(None, assignments.split(",")):
        key, _, value = assignment.partition("=")
        if key not in fields:
            raise SystemExit(f"recipe {name}: unknown setting {key!r}")
        overrides[key] = Path(value) if key in PATH_SETTINGS else {"int": int, "float": float, "bool": _boolean, "str": str}[fields[key].type](value)
    return name, overrides


def _boolean(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")


def run_one(args: argparse.Namespace, name: str, overrides: dict[str, object], seed: int) -> dict[str, object]:
    out = args.work / f"{name}_s{seed}.pt"
    settings = FitSettings(features=args.train, masks=args.masks, classes=args.classes, out=out,
                           baseline_out=args.work / f"baseline_s{seed}.pt", seed=seed, epochs=args.epochs)
    settings = dataclasses.replace(settings, **overrides)
    started = time.perf_counter()
    run_fit(settings, progress=False)
    fit_seconds = time.perf_counter() - started
    summary = run_evaluate(EvaluateSettings(model=out, baseline=baseline_path(settings), features=args.val,
                                            out=args.work / f"{name}_s{seed}_eval", crf=args.crf, workers=2),
                           progress=False)
    history = json.loads(out.with_name(out.stem + ".history.json").read_text())
    row = {"recipe": name, "seed": seed, "fit_seconds": round(fit_seconds, 1),
           "labelled": round(history[-1]["labelled_fraction"], 3)}
    for role in ("baseline", "primaps_em"):
        row[f"{role}_clusters"] = summary[role]["clusters_used"]
        for variant in ("no_crf", "crf"):
            if variant in summary[role]:
                row[f"{role}_{variant}"] = (summary[role][variant]["pixel_accuracy"], summary[role][variant]["miou"])
    return row


def print_table(rows: list[dict[str, object]], crf: bool) -> None:
    variants = ("no_crf", "crf") if crf else ("no_crf",)
    print("| recipe | seed | Baseline acc / mIoU | EM acc / mIoU | EM − Baseline | clusters (B / EM) | labelled | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for variant in variants:
            base, em = row[f"baseline_{variant}"], row[f"primaps_em_{variant}"]
            print(f"| {row['recipe']} ({variant}) | {row['seed']} | {base[0]:.1f} / {base[1]:.1f} | {em[0]:.1f} / {em[1]:.1f} "
                  f"| {em[0] - base[0]:+.1f} / {em[1] - base[1]:+.1f} | {row['baseline_clusters']} / {row['primaps_em_clusters']} "
                  f"| {row['labelled']} | {row['fit_seconds']} |")
    print()
    print("| recipe | variant | Baseline mean | EM mean (± std over seeds) | EM − Baseline |")
    print("|---|---|---|---|---|")
    for name in dict.fromkeys(row["recipe"] for row in rows):
        group = [row for row in rows if row["recipe"] == name]
        for variant in variants:
            base = np.array([row[f"baseline_{variant}"] for row in group])
            em = np.array([row[f"primaps_em_{variant}"] for row in group])
            gain = (em - base).mean(axis=0)
            print(f"| {name} | {variant} | {base[:, 0].mean():.1f} / {base[:, 1].mean():.1f} | "
                  f"{em[:, 0].mean():.1f} ± {em[:, 0].std():.1f} / {em[:, 1].mean():.1f} ± {em[:, 1].std():.1f} | "
                  f"{gain[0]:+.1f} / {gain[1]:+.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True, help="training feature file")
    parser.add_argument("--val", type=Path, required=True, help="labelled evaluation feature file")
    parser.add_argument("--masks", type=Path, required=True, help="default mask directory of the training file")
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--epochs", type=int, default=FitSettings.epochs, help="default epochs (a recipe may override)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--crf", action="store_true", help="also score CRF-refined predictions")
    parser.add_argument("--work", type=Path, required=True, help="directory for models and evaluation outputs")
    parser.add_argument("--recipe", action="append", required=True, help="NAME:key=value,... (repeatable)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for text in args.recipe:
        name, overrides = parse_recipe(text)
        for seed in (int(seed) for seed in args.seeds.split(",")):
            rows.append(run_one(args, name, overrides, seed))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print_table(rows, args.crf)


if __name__ == "__main__":
    main()
