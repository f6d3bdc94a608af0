"""Choose a PriMaPs-EM recipe with the TRAINING split's labels only: cross-validation over training images.

For every dataset, the training images are split into folds; for every (recipe, dataset, fold, seed) the real
`fit` stage runs with the fold held out (`fit --holdout`) and the real `evaluate` stage scores the EM model and
its Baseline on that fold alone (`evaluate --images`, flip-averaged tokens when the training file has them, no
CRF). Validation labels are never read. A recipe's score is its worst normalised gain over the datasets,
min over datasets of min(ΔAcc / 5, ΔmIoU / 3), the fraction of the target (+5 Acc, +3 mIoU over the Baseline)
it reaches where it reaches it least, so a recipe that wins on one dataset and loses on another ranks low.

Datasets: `NAME:train=FILE,masks=DIR_TEMPLATE,classes=K,folds=prefix|randomN`. DIR_TEMPLATE holds `{}`, filled
with a recipe's `masks=` variant (default `mean`). `folds=prefix` groups images by their name up to the first
`_` (CamVid: one fold per video sequence, so a fold is a scene the fit never saw); `randomN` makes N seeded
random folds. Recipes: `NAME:key=value,...` with `FitSettings` field names, as in em_study.py. A recipe with
`head=HEAD` fits PriMaPs-EM on that head's code and scores it against the head's cluster probe, which then is the
fold's Baseline (a head trained on the whole split saw the fold's images, never their labels); give such recipes
their own --work, since the Baseline files are shared per fold.

Example:
  .venv/bin/python benchmarks/recipe_cv.py --work /work/study/cv --seeds 0 \\
      --dataset camvid:train=/work/study/camvid/train.h5,masks=/work/study/camvid/masks_{},classes=11,folds=prefix \\
      --dataset msrc:train=/work/study/msrc/train.h5,masks=/work/study/msrc/masks_{},classes=21,folds=random3 \\
      --recipe default: --recipe lr1e-3:learning_rate=0.001 --recipe reference_sign:masks=ref
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from em_study import parse_recipe  # noqa: E402
from pipeline.store.features import FeatureFile  # noqa: E402
from stages.evaluate import EvaluateSettings, run_evaluate  # noqa: E402
from stages.fit import FitSettings, baseline_path, run_fit  # noqa: E402

TARGET = (5.0, 3.0)


def parse_dataset(text: str) -> dict[str, str]:
    name, _, assignments = text.partition(":")
    spec = dict(assignment.split("=", 1) for assignment in assignments.split(","))
    missing = {"train", "masks", "classes", "folds"} - set(spec)
    if missing or "{}" not in spec["masks"]:
        raise SystemExit(f"dataset {name}: need train=, masks= (with {{}}), classes=, folds= (missing {sorted(missing)})")
    return {"name": name, **spec}


def make_folds(names: list[str], rule: str, seed: int = 0) -> list[list[str]]:
    """Image-name folds: by name prefix (before the first '_') or N seeded random folds."""
    if rule == "prefix":
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(name.split("_", 1)[0], []).append(name)
        return [groups[key] for key in sorted(groups)]
    if rule.startswith("random"):
        count = int(rule.removeprefix("random"))
        order = np.random.default_rng(seed).permutation(len(names))
        return [sorted(names[i] for i in order[part::count]) for part in range(count)]
    raise SystemExit(f"unknown fold rule {rule!r}: prefix or randomN")


def parse_cv_recipe(text: str) -> tuple[str, str, dict[str, object]]:
    """`NAME:key=value,...` → (NAME, mask variant, FitSettings overrides); `masks=VARIANT` picks the mask directory."""
    name, _, assignments = text.partition(":")
    variant, rest = "mean", []
    for assignment in filter(None, assignments.split(",")):
        key, _, value = assignment.partition("=")
        if key == "masks":
            variant = value
        else:
            rest.append(assignment)
    return name, variant, parse_recipe(f"{name}:{','.join(rest)}")[1]


def run_one(dataset: dict[str, str], fold_file: Path, name: str, variant: str, overrides: dict[str, object],
            seed: int, epochs: int, work: Path) -> dict[str, object]:
    masks = Path(dataset["masks"].format(variant))
    stem = f"{dataset['name']}_{fold_file.stem}_{name}_s{seed}"
    settings = FitSettings(features=Path(dataset["train"]), masks=masks, classes=int(dataset["classes"]),
                           out=work / f"{stem}.pt", holdout=fold_file, seed=seed, epochs=epochs,
                           baseline_out=work / f"{dataset['name']}_{fold_file.stem}_baseline_s{seed}.pt")
    settings = dataclasses.replace(settings, **overrides)
    started = time.perf_counter()
    run_fit(settings, progress=False)
    seconds = time.perf_counter() - started
    summary = run_evaluate(EvaluateSettings(model=settings.out, baseline=baseline_path(settings),
                                            features=Path(dataset["train"]), images=fold_file,
                                            out=work / f"{stem}_eval"), progress=False)
    row = {"recipe": name, "dataset": dataset["name"], "fold": fold_file.stem, "seed": seed,
           "fit_seconds": round(seconds, 1), "clusters": summary["primaps_em"]["clusters_used"]}
    for role in ("baseline", "primaps_em"):
        row[role] = (summary[role]["no_crf"]["pixel_accuracy"], summary[role]["no_crf"]["miou"])
    return row


def print_tables(rows: list[dict[str, object]], datasets: list[str]) -> None:
    print("| recipe | " + " | ".join(f"{d}: Baseline → EM (Δ Acc / Δ mIoU)" for d in datasets) + " | score |")
    print("|---|" + "---|" * len(datasets) + "---|")
    scored = []
    for recipe in dict.fromkeys(row["recipe"] for row in rows):
        cells, fractions = [], []
        for dataset in datasets:
            group = [row for row in rows if row["recipe"] == recipe and row["dataset"] == dataset]
            if not group:
                cells.append("")
                continue
            base = np.mean([row["baseline"] for row in group], axis=0)
            em = np.mean([row["primaps_em"] for row in group], axis=0)
            gain = em - base
            fractions.append(min(gain[0] / TARGET[0], gain[1] / TARGET[1]))
            cells.append(f"{base[0]:.1f}/{base[1]:.1f} → {em[0]:.1f}/{em[1]:.1f} ({gain[0]:+.1f} / {gain[1]:+.1f})")
        score = min(fractions) if len(fractions) == len(datasets) else float("nan")
        scored.append((score, recipe))
        print(f"| {recipe} | " + " | ".join(cells) + f" | {score:.2f} |")
    print()
    best = max(scored, key=lambda item: -np.inf if np.isnan(item[0]) else item[0])
    print(f"chosen by the training-fold protocol: {best[1]} (score {best[0]:.2f}; 1.00 = the target on every dataset)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", required=True, help="NAME:train=…,masks=…{}…,classes=K,folds=…")
    parser.add_argument("--recipe", action="append", required=True, help="NAME:key=value,... (masks=VARIANT allowed)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=FitSettings.epochs, help="default epochs (a recipe may override)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--rows", type=Path, default=None, help="append every row as JSON here (and resume from it)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows_path = args.rows or args.work / "rows.jsonl"
    done = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
    datasets = [parse_dataset(text) for text in args.dataset]
    rows = []
    for dataset in datasets:
        with FeatureFile(dataset["train"]) as features:
            names = [features.names[int(i)] for i in features.valid_indices()]
        folds = make_folds(names, dataset["folds"])
        dataset["fold_files"] = []
        for number, fold in enumerate(folds):
            path = args.work / f"{dataset['name']}_fold{number}.txt"
            path.write_text("\n".join(fold) + "\n")
            dataset["fold_files"].append(path)
        print(f"{dataset['name']}: {len(names)} training images in folds of {[len(fold) for fold in folds]}", flush=True)
    for text in args.recipe:
        name, variant, overrides = parse_cv_recipe(text)
        for dataset in datasets:
            for fold_file in dataset["fold_files"]:
                for seed in (int(seed) for seed in args.seeds.split(",")):
                    key = (name, dataset["name"], fold_file.stem, seed)
                    previous = [row for row in done if (row["recipe"], row["dataset"], row["fold"], row["seed"]) == key]
                    if previous:
                        rows.append(previous[-1])
                        continue
                    row = run_one(dataset, fold_file, name, variant, overrides, seed, args.epochs, args.work)
                    rows.append(row)
                    with rows_path.open("a") as handle:
                        handle.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
    print()
    print_tables(rows, [dataset["name"] for dataset in datasets])


if __name__ == "__main__":
    main()
