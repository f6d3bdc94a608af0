"""Fingerprint every output of a small end-to-end run, so that a refactoring can be shown to change no result.

`run` executes the real CLI in a scratch folder, the way a user would, on two small inputs: the embedded demo
(scikit-image's photos, the default backbone) and a CamVid subset (train and val, K = 11), through extract, propose,
fit, evaluate, inspect and predict, plus a STEGO head trained from the cache and a fit on its code. It writes
`snapshot.json`: the SHA-256 of every array in every feature file, of every mask PNG, of every tensor in every
model / Baseline / head file (its optimiser state included), and the metrics themselves. `compare A B` prints
every entry that differs and exits 1 if any does. Run both with the same command line on the two code versions
(e.g. a `git worktree` of the old commit, its own `--repo`):

    .venv/bin/python tools/output_snapshot.py run --repo . --work /tmp/snap --fit-args "--set batch_size=8"
    .venv/bin/python tools/output_snapshot.py run --repo /tmp/old_tree --work /tmp/snap --fit-args "--batch-size 8"
    (move the first snapshot.json aside: the same --work keeps the recorded paths equal)
    .venv/bin/python tools/output_snapshot.py compare old_snapshot.json /tmp/snap/snapshot.json

Costs a few minutes on 2 cores. Settings are the CLI defaults unless `--fit-args` adds some to every fit; give each
code version the options it spells the same settings with (e.g. `--batch-size 8` before recipes, `--set batch_size=8`
after). The demo (8 images) is one batch either way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

DEFAULT_CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _tensors(prefix: str, value: Any, into: dict[str, str]) -> None:
    """Every tensor or array inside a nested checkpoint structure, by its path; scalars and strings as text."""
    if isinstance(value, torch.Tensor):
        into[prefix] = f"{tuple(value.shape)} {value.dtype} {_sha(value.detach().cpu().contiguous().numpy().tobytes())}"
    elif isinstance(value, np.ndarray):
        into[prefix] = f"{value.shape} {value.dtype} {_sha(np.ascontiguousarray(value).tobytes())}"
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            _tensors(f"{prefix}/{key}", value[key], into)
    elif isinstance(value, (list, tuple)):
        for position, item in enumerate(value):
            _tensors(f"{prefix}[{position}]", item, into)
    elif isinstance(value, (int, float, str, bool)) or value is None:
        into[prefix] = repr(value)


def _dataset_sha(item: h5py.Dataset | h5py.Group) -> str:
    """An HDF5 dataset's fingerprint: its bytes, or for strings (object arrays hold pointers) their decoded text."""
    if not isinstance(item, h5py.Dataset):
        return "group"
    if item.dtype.kind == "O":
        return _sha(json.dumps([value.decode() if isinstance(value, bytes) else str(value)
                                for value in item.asstr()[()].ravel()]).encode())
    return _sha(item[()].tobytes())


def fingerprint_tree(root: Path) -> dict[str, str]:
    """Fingerprints of every output under `root` (feature files, PNGs, checkpoints, JSON metrics)."""
    entries: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        name = str(path.relative_to(root))
        if path.suffix == ".h5":
            with h5py.File(path, "r") as handle:
                handle.visititems(lambda key, item: entries.__setitem__(f"{name}:{key}", _dataset_sha(item)))
        elif path.suffix == ".png":
            entries[name] = _sha(path.read_bytes())
        elif path.suffix == ".pt":
            _tensors(name, torch.load(path, map_location="cpu", weights_only=False), entries)
        elif path.name in ("metrics.json", "details.json", "history.json"):
            entries[name] = json.dumps(_without_times(json.loads(path.read_text())), sort_keys=True)
    return entries


def _without_times(value: Any) -> Any:
    """JSON without wall-clock fields, which differ between any two runs."""
    if isinstance(value, dict):
        return {key: _without_times(item) for key, item in value.items() if "second" not in key and key != "time"}
    if isinstance(value, list):
        return [_without_times(item) for item in value]
    return value


def run(repo: Path, work: Path, camvid: Path, fit_args: str) -> None:
    work.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo.resolve())}
    command = [sys.executable, "-m", "pipeline"]
    extra = shlex.split(fit_args)

    def cli(*arguments: str) -> None:
        print("+", " ".join(arguments), flush=True)
        subprocess.run([*command, *arguments], check=True, cwd=work, env=environment, stdout=subprocess.DEVNULL)

    out = work / "out"
    cli("extract", "--dataset", "sample", "--split", "train", "--views", "2", "--out", f"{out}/demo/train.h5")
    cli("propose", "--features", f"{out}/demo/train.h5", "--out", f"{out}/demo/masks", "--workers", "2")
    cli("fit", "--features", f"{out}/demo/train.h5", "--masks", f"{out}/demo/masks", "--classes", "5", "--epochs", "8",
        "--out", f"{out}/demo/model.pt", *extra)
    cli("inspect", "--features", f"{out}/demo/train.h5", "--masks", f"{out}/demo/masks", "--model",
        f"{out}/demo/model.pt", "--sample", "2", "--out", f"{out}/demo/inspect")

    camvid_args = ["--dataset", "camvid", "--root", str(camvid), "--max-images", "24"]
    cli("extract", *camvid_args, "--split", "train", "--views", "2", "--out", f"{out}/camvid/train.h5")
    cli("extract", *camvid_args, "--split", "val", "--flip-average", "--out", f"{out}/camvid/eval.h5")
    cli("propose", "--features", f"{out}/camvid/train.h5", "--out", f"{out}/camvid/masks", "--workers", "2")
    cli("fit", "--features", f"{out}/camvid/train.h5", "--masks", f"{out}/camvid/masks", "--classes", "11",
        "--epochs", "6", "--out", f"{out}/camvid/model.pt", *extra)
    cli("evaluate", "--model", f"{out}/camvid/model.pt", "--baseline", f"{out}/camvid/model.baseline.pt",
        "--features", f"{out}/camvid/eval.h5", "--crf", "--out", f"{out}/camvid/eval")
    cli("head", "--features", f"{out}/camvid/train.h5", "--clusters", "11", "--epochs", "2", "--batch-size", "8",
        "--out", f"{out}/camvid/head.pt")
    cli("fit", "--features", f"{out}/camvid/train.h5", "--masks", f"{out}/camvid/masks", "--classes", "11",
        "--epochs", "4", "--head", f"{out}/camvid/head.pt", "--out", f"{out}/camvid/stego/model.pt",
        "--baseline-out", f"{out}/camvid/stego/probe.pt", *extra)
    cli("evaluate", "--model", f"{out}/camvid/stego/model.pt", "--baseline", f"{out}/camvid/stego/probe.pt",
        "--features", f"{out}/camvid/eval.h5", "--out", f"{out}/camvid/stego/eval")
    photo = next(iter(sorted((camvid / "val").iterdir())))
    cli("predict", "--model", f"{out}/camvid/model.pt", str(photo), "--out", f"{out}/camvid/predict")

    snapshot = fingerprint_tree(out)
    (work / "snapshot.json").write_text(json.dumps(snapshot, indent=1, sort_keys=True))
    print(f"{len(snapshot)} entries → {work / 'snapshot.json'}")


def compare(first: Path, second: Path) -> int:
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    differing = sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))
    for key in differing:
        print(f"{key}: {a.get(key, '(missing)')} != {b.get(key, '(missing)')}")
    print(f"{len(a)} and {len(b)} entries; {len(differing)} differ")
    return 1 if differing else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    run_parser = verbs.add_parser("run", help="run the small pipeline and write WORK/snapshot.json")
    run_parser.add_argument("--repo", type=Path, default=Path("."), help="the code tree to run (PYTHONPATH)")
    run_parser.add_argument("--work", type=Path, required=True)
    run_parser.add_argument("--camvid", type=Path, default=Path(os.environ.get("PRIMAPS_CAMVID_ROOT", DEFAULT_CAMVID)))
    run_parser.add_argument("--fit-args", default="", help="extra options for every fit (the same on both sides)")
    compare_parser = verbs.add_parser("compare", help="print the entries of two snapshots that differ")
    compare_parser.add_argument("first", type=Path)
    compare_parser.add_argument("second", type=Path)
    args = parser.parse_args()
    if args.verb == "run":
        run(args.repo, args.work, args.camvid, args.fit_args)
    else:
        sys.exit(compare(args.first, args.second))


if __name__ == "__main__":
    main()
