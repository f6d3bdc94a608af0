"""STEGO trained from the feature cache, and PriMaPs-EM on top of it: Baseline | PriMaPs-EM | STEGO | STEGO + EM.

For every seed the real stages run: `head` (a STEGO head and cluster probe trained on the training cache with
one of params.yaml's presets), `fit` (PriMaPs-EM on the tokens, and its Baseline) and `fit --head` (PriMaPs-EM
on the head's code, from its cluster probe), then `evaluate` scores the four rows on the evaluation split, with
and without CRF. The table gives each row per seed and the mean ± std, then STEGO − Baseline and
STEGO + PriMaPs-EM − STEGO (the issue's target: ≥ +2 Acc and ≥ +1.5 mIoU, mean of 3 seeds, last checkpoint).

Example:
  .venv/bin/python benchmarks/head_study.py --train /work/study/camvid/train.h5 --val /work/study/camvid/eval.h5 \\
      --masks /work/study/camvid/masks_mean --classes 11 --preset camvid --epochs 40 --seeds 0,1,2 \\
      --work /work/study/heads --crf
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from em_study import parse_recipe  # noqa: E402
from pipeline.params import load_section  # noqa: E402
from stages.evaluate import EvaluateSettings, run_evaluate  # noqa: E402
from stages.fit import FitSettings, run_fit  # noqa: E402
from stages.head import TrainHeadSettings, run_train_head  # noqa: E402

ROWS = ("baseline", "primaps_em", "stego", "stego_primaps_em")
HEAD_KEYS = {"code_dim", "epochs", "batch_size", "learning_rate", "probe_learning_rate", "neighbours",
             "feature_samples", "neg_samples", "center", "seed", "pos_intra_weight", "pos_intra_shift",
             "pos_inter_weight", "pos_inter_shift", "neg_inter_weight", "neg_inter_shift", "probe"}


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, object]:
    preset = {key: value for key, value in load_section(args.params, f"head.{args.preset}").items() if key in HEAD_KEYS}
    preset.update(seed=seed, epochs=args.epochs, center=None if preset.get("center") == "auto" else preset.get("center"))
    head_path = args.work / f"head_{args.preset}_e{args.epochs}_s{seed}.pt"
    started = time.perf_counter()
    run_train_head(TrainHeadSettings(features=args.train, out=head_path, clusters=args.classes,
                                     neighbours_out=args.work / "neighbours.npz", **preset), progress=False)
    head_seconds = time.perf_counter() - started
    plain = FitSettings(features=args.train, masks=args.masks, classes=args.classes, out=args.work / f"em_s{seed}.pt",
                        baseline_out=args.work / f"baseline_s{seed}.pt", seed=seed, epochs=args.fit_epochs)
    plain = dataclasses.replace(plain, **args.fit_overrides)
    run_fit(plain, progress=False)
    on_head = FitSettings(features=args.train, masks=args.masks, classes=args.classes, head=head_path,
                          out=args.work / f"stego_em_{args.preset}_e{args.epochs}_s{seed}.pt",
                          baseline_out=args.work / f"stego_probe_{args.preset}_e{args.epochs}_s{seed}.pt", seed=seed,
                          epochs=args.fit_epochs)
    on_head = dataclasses.replace(on_head, **args.fit_overrides)
    run_fit(on_head, progress=False)
    summary = run_evaluate(EvaluateSettings(
        model=plain.out, baseline=plain.baseline_out, features=args.val, crf=args.crf, workers=2,
        extra_models=(("stego", on_head.baseline_out), ("stego_primaps_em", on_head.out)),
        out=args.work / f"eval_{args.preset}_e{args.epochs}_s{seed}"), progress=False)
    row: dict[str, object] = {"seed": seed, "head_seconds": round(head_seconds, 1)}
    for name in ROWS:
        row[f"{name}_clusters"] = summary[name]["clusters_used"]
        for variant in ("no_crf", "crf"):
            if variant in summary[name]:
                row[f"{name}_{variant}"] = (summary[name][variant]["pixel_accuracy"], summary[name][variant]["miou"])
    return row


def print_table(rows: list[dict[str, object]], variants: tuple[str, ...]) -> None:
    for variant in variants:
        print(f"\n{variant.replace('_', ' ')}: Acc / mIoU per seed, then mean ± std")
        print("| row | " + " | ".join(f"seed {row['seed']}" for row in rows) + " | mean ± std |")
        print("|---|" + "---|" * len(rows) + "---|")
        values = {name: np.array([row[f"{name}_{variant}"] for row in rows]) for name in ROWS}
        for name in ROWS:
            cells = " | ".join(f"{acc:.1f} / {miou:.1f}" for acc, miou in values[name])
            mean, std = values[name].mean(axis=0), values[name].std(axis=0)
            print(f"| {name} | {cells} | {mean[0]:.1f} ± {std[0]:.1f} / {mean[1]:.1f} ± {std[1]:.1f} |")
        for label, better, worse in (("STEGO − Baseline", "stego", "baseline"),
                                     ("PriMaPs-EM − Baseline", "primaps_em", "baseline"),
                                     ("STEGO + PriMaPs-EM − STEGO", "stego_primaps_em", "stego")):
            gain = (values[better] - values[worse]).mean(axis=0)
            print(f"| {label} | " + " | ".join("" for _ in rows) + f" | {gain[0]:+.1f} / {gain[1]:+.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--val", type=Path, required=True)
    parser.add_argument("--masks", type=Path, required=True)
    parser.add_argument("--classes", type=int, required=True)
    parser.add_argument("--params", type=Path, default=Path(__file__).resolve().parents[1] / "params.yaml")
    parser.add_argument("--preset", default="camvid", help="a head.<preset> section of params.yaml")
    parser.add_argument("--epochs", type=int, default=40, help="head epochs")
    parser.add_argument("--fit-epochs", type=int, default=FitSettings.epochs)
    parser.add_argument("--fit-settings", default="",
                        help="key=value,... recipe keys (or recipe=NAME) for both EM fits, which otherwise take "
                             "their default recipes (tokens: tuned; the head's code: head)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--crf", action="store_true")
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    args.fit_overrides = parse_recipe(f"fit-settings:{args.fit_settings}")[1]
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in (int(seed) for seed in args.seeds.split(",")):
        rows.append(run_seed(args, seed))
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows, ("no_crf", "crf") if args.crf else ("no_crf",))


if __name__ == "__main__":
    main()
