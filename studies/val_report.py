"""Per-class view of an `em_study.py` run: each class's IoU change over the Baseline, mean over the seeds.

Reads WORK/<recipe>_s<seed>_eval/details.json for every seed found and prints, with and without CRF (when the run
scored it), every class's mean IoU change (EM − the seed's Baseline), worst first, and how many clusters θ_M gives
a pixel of the split on each seed.

Example:
  .venv/bin/python studies/val_report.py /tmp/em_camvid --recipe anchored
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="em_study.py --work folder")
    parser.add_argument("--recipe", required=True)
    args = parser.parse_args()
    runs = sorted(args.work.glob(f"{args.recipe}_s*_eval/details.json"))
    if not runs:
        raise SystemExit(f"{args.work}: no {args.recipe}_s*_eval/details.json")
    found = [json.loads(path.read_text()) for path in runs]
    print(f"{args.recipe}: {len(found)} seeds; clusters θ_M predicts on the split, per seed: "
          f"{[sum(share > 0 for share in run['primaps_em']['cluster_share']) for run in found]} of "
          f"{len(found[0]['primaps_em']['cluster_share'])}")
    variants = [variant for variant in ("no_crf", "crf") if variant in found[0]["primaps_em"]]
    classes = list(found[0]["primaps_em"]["no_crf"]["per_class_iou"])
    gains = {variant: {name: float(np.mean([run["primaps_em"][variant]["per_class_iou"][name]
                                            - run["baseline"][variant]["per_class_iou"][name] for run in found]))
                       for name in classes} for variant in variants}
    print("| class | " + " | ".join(f"ΔIoU {variant}" for variant in variants) + " |")
    print("|---|" + "---|" * len(variants))
    for name in sorted(classes, key=lambda name: gains["no_crf"][name]):
        print(f"| {name} | " + " | ".join(f"{gains[variant][name]:+.1f}" for variant in variants) + " |")


if __name__ == "__main__":
    main()
