"""PriMaPs-EM recipe study: fit and evaluate named recipes over several seeds, print Baseline vs EM side by side.

Each recipe is `NAME:key=value,key=value`: recipe keys (`primaps-pipeline recipes`), `recipe=NAME` for another named
recipe to start from, `epochs=N`, and `masks=DIR` for another mask directory;
every (recipe, seed) pair runs the real `fit` and `evaluate` stages, so the figures are what a user gets. The
Baseline of each seed is scored too; the last columns are EM minus Baseline, averaged over the seeds. The target
is ≥ +5 points of pixel accuracy and ≥ +3 points of mIoU over the Baseline, at the last epoch, θ_M (README, recipe).

Example:
  .venv/bin/python studies/em_study.py --train cache/camvid/train.h5 --val cache/camvid/eval.h5 \
      --masks cache/camvid/masks --classes 11 --seeds 0,1,2 --work /tmp/em \
      --recipe default: --recipe lr1e-3:learning_rate=0.001 --recipe paper:recipe=paper,masks=MASKS_PSI04
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from pipeline.em.config import parse_assignment
from pipeline.errors import PipelineError
from stages.evaluate import EvaluateSettings, run_evaluate
from stages.fit import FitSettings, baseline_path, run_fit


PATH_SETTINGS = ("masks", "head")
"""FitSettings fields a recipe sets to a path: another mask directory, or a segmentation head to fit on."""
STAGE_SETTINGS = {"epochs": int, "recipe": str}
"""FitSettings fields a recipe may set besides paths; every other key is a recipe key (`fit --set`)."""


def parse_recipe(text: str) -> tuple[str, dict[str, object]]:
    """`NAME:key=value,...` → (NAME, changes): FitSettings fields (paths, `epochs`, `recipe`) typed as such, and every
    other key as a recipe key under `overrides` (typed and checked as `fit --set KEY=VALUE`)."""
    name, _, assignments = text.partition(":")
    changes: dict[str, object] = {}
    overrides: dict[str, object] = {}
    for assignment in filter(None, assignments.split(",")):
        key, _, value = assignment.partition("=")
        if key in PATH_SETTINGS:
            changes[key] = Path(value)
        elif key in STAGE_SETTINGS:
            changes[key] = STAGE_SETTINGS[key](value)
        else:
            try:
                overrides.update([parse_assignment(assignment)])
            except PipelineError as error:
                raise SystemExit(f"recipe {name}: {error}") from None
    return name, {**changes, "overrides": overrides}


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
