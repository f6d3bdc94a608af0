"""Choose a STEGO head's loss shifts for a new dataset with the TRAINING split's labels only.

STEGO's shifts were tuned per dataset on DINO ViT-B/8 tokens; on another backbone or dataset they need choosing
again. For each candidate (a params.yaml preset, a centring rule and an offset added to its three shifts) the
real stages run: `head` on the training cache (one seed, few epochs), `fit --head` for one epoch to write the
head's cluster probe, and `evaluate` of that probe on the SAME training split, whose labels the head never saw.
The validation split is not read. Prints one JSON row per candidate, then a table sorted by mIoU.

Example (CamVid, the sweep behind params.yaml's `head.camvid`):
  .venv/bin/python benchmarks/head_shift_sweep.py --train cache/camvid/train.h5 --masks cache/camvid/masks_mean \\
      --classes 11 --candidates cityscapes:auto:0 cityscapes:auto:0.1 cityscapes:auto:0.2 cityscapes:auto:0.3 \\
      --work /tmp/head_sweep
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.params import load_section  # noqa: E402
from stages.evaluate import EvaluateSettings, run_evaluate  # noqa: E402
from stages.fit import FitSettings, run_fit  # noqa: E402
from stages.head import TrainHeadSettings, run_train_head  # noqa: E402

LOSS_KEYS = ("code_dim", "pos_intra_weight", "pos_intra_shift", "pos_inter_weight", "pos_inter_shift",
             "neg_inter_weight", "neg_inter_shift")
SHIFTS = ("pos_intra_shift", "pos_inter_shift", "neg_inter_shift")


def score_candidate(args: argparse.Namespace, candidate: str) -> dict[str, object]:
    """Train a head for `candidate` (preset:center:offset), and score its cluster probe on the training labels."""
    preset, center, offset = candidate.split(":")
    settings = {key: value for key, value in load_section(args.params, f"head.{preset}").items() if key in LOSS_KEYS}
    settings.update({key: settings[key] + float(offset) for key in SHIFTS})
    name = candidate.replace(":", "_")
    head = TrainHeadSettings(features=args.train, out=args.work / f"head_{name}.pt", clusters=args.classes,
                             epochs=args.epochs, seed=args.seed, center=None if center == "auto" else center,
                             neighbours_out=args.work / f"neighbours_{center}.npz", **settings)
    run_train_head(head, progress=False)
    fit = FitSettings(features=args.train, masks=args.masks, classes=args.classes, head=head.out, epochs=1,
                      out=args.work / f"em_{name}.pt", baseline_out=args.work / f"probe_{name}.pt", seed=args.seed)
    run_fit(fit, progress=False)
    summary = run_evaluate(EvaluateSettings(model=fit.baseline_out, features=args.train,
                                            out=args.work / f"eval_{name}"), progress=False)["primaps_em"]
    return {"candidate": candidate, "clusters_used": summary["clusters_used"],
            "acc": summary["no_crf"]["pixel_accuracy"], "miou": summary["no_crf"]["miou"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True, help="training feature file (with labels)")
    parser.add_argument("--masks", type=Path, required=True, help="its PriMaPs masks (fit needs them)")
    parser.add_argument("--classes", type=int, required=True)
    parser.add_argument("--candidates", nargs="+", required=True,
                        help="preset:center:offset, e.g. cityscapes:auto:0.1 (center auto | none | dataset_mean)")
    parser.add_argument("--params", type=Path, default=Path(__file__).resolve().parents[1] / "params.yaml")
    parser.add_argument("--epochs", type=int, default=10, help="head epochs per candidate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for candidate in args.candidates:
        rows.append(score_candidate(args, candidate))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| candidate (preset:center:shift offset) | clusters used | train Acc | train mIoU |\n|---|---|---|---|")
    for row in sorted(rows, key=lambda row: -row["miou"]):
        print(f"| {row['candidate']} | {row['clusters_used']} | {row['acc']:.2f} | {row['miou']:.2f} |")


if __name__ == "__main__":
    main()
