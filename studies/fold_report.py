"""The per-class and per-cluster view of a `recipe_cv.py` run: what a fold table of Acc / mIoU alone hides.

For every (recipe, dataset) of a recipe_cv work folder (its rows.jsonl and the evaluation folders beside it) this
prints the fold-mean gain over the fold Baselines, the gain per fold, how many clusters θ_M predicts on each held-out
fold and how many own pseudo labels in the fit's last epoch (the history's class shares), and every class's
fold-mean IoU change, worst first, and whether the recipe is eligible by the rule of docs/results/em-vote-rules.md:
θ_M predicts every cluster on every held-out fold, every cluster owns pseudo labels at the end of every fit, and no
class falls by more than 10 IoU on the fold mean.

Example:
  .venv/bin/python studies/fold_report.py /work/study/A_camvid /work/study/A_msrc
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

WORST_CLASS_DROP = -10.0


def fold_rows(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "rows.jsonl").read_text().splitlines() if line.strip()]


def details(work: Path, row: dict) -> dict:
    stem = f"{row['dataset']}_{row['fold']}_{row['recipe']}_s{row['seed']}"
    return {"eval": json.loads((work / f"{stem}_eval" / "details.json").read_text()),
            "history": json.loads((work / f"{stem}.history.json").read_text())}


def summarise(work: Path, recipe: str, dataset: str, rows: list[dict]) -> dict:
    group = [row for row in rows if row["recipe"] == recipe and row["dataset"] == dataset]
    gains, predicted, labelled, class_gains = [], [], [], []
    for row in group:
        found = details(work, row)
        gains.append(np.subtract(row["primaps_em"], row["baseline"]))
        predicted.append(sum(share > 0 for share in found["eval"]["primaps_em"]["cluster_share"]))
        labelled.append(sum(share > 0 for share in found["history"][-1]["class_shares"]))
        em = found["eval"]["primaps_em"]["no_crf"]["per_class_iou"]
        base = found["eval"]["baseline"]["no_crf"]["per_class_iou"]
        class_gains.append({name: em[name] - base[name] for name in em})
    names = list(class_gains[0])
    per_class = {name: float(np.mean([gain[name] for gain in class_gains])) for name in names}
    clusters = len(details(work, group[0])["history"][-1]["class_shares"])
    return {"recipe": recipe, "dataset": dataset, "folds": len(group), "mean": np.mean(gains, axis=0),
            "per_fold": gains, "predicted": predicted, "labelled": labelled, "clusters": clusters,
            "per_class": dict(sorted(per_class.items(), key=lambda item: item[1])),
            "eligible": min(predicted) == clusters and min(labelled) == clusters
            and min(per_class.values()) >= WORST_CLASS_DROP}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, nargs="+", help="recipe_cv.py --work folders")
    args = parser.parse_args()
    print("| recipe | dataset | Δ Acc / Δ mIoU (fold mean) | per fold | clusters predicted on the folds | "
          "clusters with pseudo labels at the end | worst classes (fold-mean ΔIoU) | eligible |")
    print("|---|---|---|---|---|---|---|---|")
    for work in args.work:
        rows = fold_rows(work)
        for dataset in dict.fromkeys(row["dataset"] for row in rows):
            for recipe in dict.fromkeys(row["recipe"] for row in rows if row["dataset"] == dataset):
                found = summarise(work, recipe, dataset, rows)
                folds = ", ".join(f"{gain[0]:+.1f}/{gain[1]:+.1f}" for gain in found["per_fold"])
                worst = ", ".join(f"{name} {gain:+.1f}" for name, gain in list(found["per_class"].items())[:3])
                print(f"| {recipe} | {dataset} | {found['mean'][0]:+.2f} / {found['mean'][1]:+.2f} | {folds} | "
                      f"{'/'.join(map(str, found['predicted']))} of {found['clusters']} | "
                      f"{'/'.join(map(str, found['labelled']))} | {worst} | {'yes' if found['eligible'] else 'no'} |")
    print()
    print("Per class, fold-mean ΔIoU (recipe × class):")
    for work in args.work:
        rows = fold_rows(work)
        for dataset in dict.fromkeys(row["dataset"] for row in rows):
            recipes = list(dict.fromkeys(row["recipe"] for row in rows if row["dataset"] == dataset))
            tables = {recipe: summarise(work, recipe, dataset, rows)["per_class"] for recipe in recipes}
            classes = list(next(iter(tables.values())))
            print(f"\n{dataset}: | class | " + " | ".join(recipes) + " |")
            print("|---|" + "---|" * len(recipes))
            for name in sorted(classes):
                print(f"| {name} | " + " | ".join(f"{tables[recipe][name]:+.1f}" for recipe in recipes) + " |")


if __name__ == "__main__":
    main()
