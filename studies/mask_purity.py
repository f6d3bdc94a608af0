"""Purity of stored PriMaPs masks against a labelled feature file (e.g. the TRAINING split's own labels).

For every mask directory: masks per image, coverage (share of pixels inside a mask), purity (share of labelled
pixels inside masks that carry their mask's majority class: what a perfect per-mask vote could reach) and strict
purity (the same over all labelled pixels, uncovered ones counted as wrong). Label-free to compute the masks;
labels only to score them.

Example:
    .venv/bin/python benchmarks/mask_purity.py --features /work/study/camvid/train.h5 \\
        --masks /work/study/camvid/masks_mean --masks /work/study/camvid/masks_ref
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psi_study import purity_counts  # noqa: E402
from pipeline.store import masks as mask_store  # noqa: E402
from pipeline.store.features import FeatureFile  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=Path, required=True, help="labelled feature file the masks were made from")
    parser.add_argument("--masks", type=Path, action="append", required=True, help="mask directory (repeatable)")
    args = parser.parse_args()
    print("| masks | ψ, centring, sign | masks / image | coverage | purity | strict purity |")
    print("|---|---|---|---|---|---|")
    with FeatureFile(args.features) as features:
        for directory in args.masks:
            primaps = mask_store.read_provenance(directory)["primaps"]
            records = mask_store.read_index(directory)
            totals = [0, 0, 0, 0, 0]
            images = pixels = 0
            for index in features.valid_indices():
                name = features.names[int(index)]
                ids = mask_store.read_mask(directory, name, records.get(name), features.resolution)
                counts = purity_counts(ids, features.label(int(index)))
                totals = [total + count for total, count in zip(totals, counts)]
                images, pixels = images + 1, pixels + ids.size
            masks, covered, labelled, labelled_covered, majority = totals
            print(f"| {directory.name} | {primaps['psi']}, {primaps['center']}, {primaps.get('sign_rule', 'mean')} "
                  f"| {masks / images:.2f} | {100 * covered / pixels:.1f}% | {100 * majority / labelled_covered:.1f}% "
                  f"| {100 * majority / labelled:.1f}% |")


if __name__ == "__main__":
    main()
