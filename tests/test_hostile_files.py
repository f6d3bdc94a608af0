"""Hostile files and extreme inputs, on real small data: every file the pipeline reads is checked before
anything is allocated in proportion to what it declares, and a refusal is one line naming the file.

- a few-kilobyte torch file that declares terabytes (a stride-0 view, which torch.save keeps) is refused under
  a hard address-space limit, in every kind of file that holds tensors;
- malformed structure (a key that is not text, a missing field, a head of other dimensions, a model without
  provenance) is one line, not a traceback;
- predict bounds the token grid of a long thin image; damaged neighbour caches are one line;
- options whose product exhausts memory are refused before the work starts; split names are names;
- a temporary left by a killed writer is removed by the next write; error lines stay one line.
"""

from __future__ import annotations

import collections
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.backbones import build_backbone
from pipeline.store.atomic import temporary_sibling, write_json_atomic
from stages.extract import ExtractSettings, run_extract
from stages.fit import FitSettings, history_path, run_fit
from stages.head import TrainHeadSettings, neighbours_path, run_train_head
from stages.predict import MAX_TOKENS, model_input_size
from stages.propose import ProposeSettings, run_propose
from tests.test_faults import cli_refuses, model, one_error_line  # noqa: F401 (model: a fixture)
from tests.test_heads import random_head_tensors, write_hp_checkpoint, write_stego_checkpoint

REPOSITORY = Path(__file__).resolve().parents[1]
HEADROOM = 2 << 30
"""Address space a refusing run may use beyond what it held after start-up: far below any bomb's declaration."""


def bomb() -> torch.Tensor:
    """One float32 storage element viewed as 2^20 × 2^20 (4 TiB declared, 4 bytes stored)."""
    return torch.zeros(1).expand(1 << 20, 1 << 20)


def cli_under_memory_limit(arguments: list) -> subprocess.CompletedProcess:
    """`primaps-pipeline ARGS` in a process whose address space is capped at its start-up size + HEADROOM:
    materialising a bomb fails there instead of swapping the machine."""
    code = ("import resource, sys; from pipeline.cli import main; "
            "held = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize(); "
            f"resource.setrlimit(resource.RLIMIT_AS, (held + {HEADROOM}, held + {HEADROOM})); "
            "sys.argv[0] = 'primaps-pipeline'; main()")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *map(str, arguments)], capture_output=True, text=True,
                          cwd=REPOSITORY, timeout=600, env=environment)


def resave(path: Path, change) -> Path:
    """Load a torch file written by the pipeline (or in a released layout), apply `change` to it, save it back."""
    record = torch.load(path, map_location="cpu", weights_only=True)
    change(record)
    torch.save(record, path)
    return path


@pytest.fixture(scope="module")
def vits16_features(tmp_path_factory, camvid) -> Path:
    out = tmp_path_factory.mktemp("vits16") / "features.h5"
    run_extract(ExtractSettings(dataset="camvid", root=str(camvid), split="val", backbone="dino_vits16", out=out,
                                resolution=64, max_images=4, random_init=True), progress=False)
    return out


@pytest.fixture(scope="module")
def head(camvid_features, tmp_path_factory) -> Path:
    """A small head trained here on the CamVid tokens (11 clusters, the fit's K)."""
    out = tmp_path_factory.mktemp("head") / "head.pt"
    run_train_head(TrainHeadSettings(features=camvid_features, out=out, clusters=11, code_dim=8, epochs=1,
                                     batch_size=4, neighbours=3, feature_samples=5, neg_samples=2), progress=False)
    return out


def copy(path: Path, to: Path) -> Path:
    to.write_bytes(path.read_bytes())
    return to


# --- 1. a small file that declares unbounded memory ------------------------------------------------------------

def stego_bomb(tmp_path: Path, **_) -> tuple[Path, list]:
    path = tmp_path / "bomb.ckpt"
    write_stego_checkpoint(path, {**random_head_tensors(384, 5, 27, seed=1), "bomb": bomb()})
    return path, ["head", "--checkpoint", path, "--type", "stego"]


def hp_bomb(tmp_path: Path, **_) -> tuple[Path, list]:
    path = tmp_path / "ckpt.pth"
    write_hp_checkpoint(path, random_head_tensors(384, 5, 27, seed=1))
    resave(path, lambda record: record["net_model_state_dict"].__setitem__("model.blocks.0.norm1.weight", bomb()))
    return path, ["head", "--checkpoint", path, "--type", "hp"]


def head_file_bomb(tmp_path: Path, head: Path, **_) -> tuple[Path, list]:
    path = resave(copy(head, tmp_path / "head.pt"), lambda record: record.__setitem__("clusters", bomb()))
    return path, ["fit", "--classes", 11, "--head", path]


def model_file_bomb(tmp_path: Path, model: Path, **_) -> tuple[Path, list]:
    path = resave(copy(model, tmp_path / "model.pt"), lambda record: record["momentum"].__setitem__("direction", bomb()))
    return path, ["evaluate", "--model", path]


def weights_bomb(tmp_path: Path, **_) -> tuple[Path, list]:
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    state = collections.OrderedDict(build_backbone("dino_vits16", random_init=True)[0].state_dict())
    state["pos_embed"] = torch.zeros(1).expand(1 << 16, 1 << 12, 1 << 12)
    torch.save(state, path)
    return path, ["extract", "--backbone", "dino_vits16", "--weights", path]


@pytest.mark.parametrize("make", [stego_bomb, hp_bomb, head_file_bomb, model_file_bomb, weights_bomb],
                         ids=["stego-ckpt", "hp-ckpt", "head-file", "model-file", "weights"])
def test_a_tensor_declaring_terabytes_is_refused_without_allocating(make, tmp_path, camvid, camvid_features,
                                                                     camvid_masks, vits16_features, head, model):
    path, arguments = make(tmp_path, head=head, model=model)
    assert path.stat().st_size < 100 << 20
    features = vits16_features if arguments[0] == "head" else camvid_features
    rest = {"head": ["--features", features, "--out", tmp_path / "out.pt"],
            "fit": ["--features", features, "--masks", camvid_masks, "--out", tmp_path / "out.pt", "--epochs", 1],
            "evaluate": ["--features", features, "--out", tmp_path / "report"],
            "extract": ["--dataset", "camvid", "--root", camvid, "--split", "val", "--max-images", 2,
                        "--resolution", 64, "--out", tmp_path / "out.h5"]}[arguments[0]]
    line = one_error_line(cli_under_memory_limit([*arguments, *rest]))
    assert str(path) in line and "over a storage of 4 bytes (an overlapping view)" in line, line
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out.h5").exists()


# --- 2. structure is checked before it is used ------------------------------------------------------------------

def test_a_state_dict_key_that_is_not_text_is_one_line(tmp_path, vits16_features):
    path = tmp_path / "ckpt.pth"
    write_hp_checkpoint(path, random_head_tensors(384, 5, 27, seed=2))
    resave(path, lambda record: record["net_model_state_dict"].__setitem__(7, torch.zeros(1)))
    line = cli_refuses(["head", "--checkpoint", path, "--type", "hp", "--features", vits16_features,
                        "--out", tmp_path / "head.pt"])
    assert str(path) in line and "has a key 7 that is not text" in line, line


def test_a_head_file_without_its_type_is_one_line(tmp_path, camvid_features, camvid_masks, head):
    path = resave(copy(head, tmp_path / "head.pt"), lambda record: record.pop("head_type"))
    line = cli_refuses(["fit", "--features", camvid_features, "--masks", camvid_masks, "--classes", 11,
                        "--head", path, "--out", tmp_path / "model.pt"])
    assert str(path) in line and "has no 'head_type'" in line, line


def test_a_head_of_other_dimensions_than_the_features_is_one_line(tmp_path, camvid_features, camvid_masks, head):
    def other_dims(record):
        tensors = random_head_tensors(100, 8, 11, seed=3)
        record["state"] = {key: value for key, value in tensors.items() if key != "clusters"}
        record["clusters"] = tensors["clusters"]

    path = resave(copy(head, tmp_path / "head.pt"), other_dims)
    line = cli_refuses(["fit", "--features", camvid_features, "--masks", camvid_masks, "--classes", 11,
                        "--head", path, "--out", tmp_path / "model.pt"])
    assert "384-dimensional tokens, but head" in line and str(path) in line and "takes 100" in line, line


def test_heads_whose_pieces_do_not_fit_together_are_one_line(tmp_path, camvid_features, camvid_masks, head):
    path = resave(copy(head, tmp_path / "head.pt"),
                  lambda record: record.__setitem__("clusters", torch.randn(11, 9)))
    line = cli_refuses(["fit", "--features", camvid_features, "--masks", camvid_masks, "--classes", 11,
                        "--head", path, "--out", tmp_path / "model.pt"])
    assert str(path) in line and "head file clusters of shape (11, 9)" in line, line


@pytest.mark.parametrize("damage, shown", [
    (lambda record: record.pop("features_provenance"), "has no 'features_provenance'"),
    (lambda record: record["features_provenance"].pop("resolution"), "lacks the provenance of its features"),
    (lambda record: record.pop("provenance"), "has no 'provenance'"),
    (lambda record: record["running"].__setitem__("gain", torch.ones(3)), "running gains of shape (3,)"),
    (lambda record: record.__setitem__("init", torch.full((11, 384), float("nan"))), "holds non-finite values"),
], ids=["no-features-provenance", "partial-provenance", "no-provenance", "wrong-gains", "nan"])
def test_a_damaged_model_file_is_one_line_in_every_reader(damage, shown, tmp_path, model, camvid_features):
    path = resave(copy(model, tmp_path / "model.pt"), damage)
    line = cli_refuses(["evaluate", "--model", path, "--features", camvid_features, "--out", tmp_path / "report"])
    assert str(path) in line and shown in line, line
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(image)
    assert cli_refuses(["predict", "--model", path, "--out", tmp_path / "predicted", image]) == line
    assert not (tmp_path / "report").exists() and not (tmp_path / "predicted").exists()


# --- 3. predict's cost per image is bounded ---------------------------------------------------------------------

def test_a_long_thin_image_is_segmented_within_the_token_cap(tmp_path, model):
    width, height = model_input_size(10, 4000, 224, 14)
    assert (width // 14) * (height // 14) <= MAX_TOKENS < (224 // 14) * (224 * 400 // 14)  # 25× fewer tokens
    assert 0.75 < (height / width) / 400 < 1.25  # the aspect survives the cap
    image = tmp_path / "thin.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (4000, 10, 3), dtype=np.uint8)).save(image)
    completed = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--model", str(model), "--out",
                                str(tmp_path / "out"), str(image)], capture_output=True, text=True, cwd=REPOSITORY,
                               timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    labels = np.asarray(Image.open(tmp_path / "out" / "thin.png"))
    assert labels.shape == (4000, 10) and labels.max() < 11


# --- 4. damaged neighbour caches ----------------------------------------------------------------------------------

def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def rewrite_table(table: np.ndarray):
    def change(path: Path) -> None:
        with np.load(path) as stored:
            members = {name: stored[name] for name in stored.files}
        members["neighbours"] = table
        np.savez(path, **members)
    return change


def declare_huge(path: Path) -> None:
    with np.load(path) as stored:
        members = {name: stored[name] for name in stored.files if name != "neighbours"}
    np.savez(path, **members)
    header = {"descr": "<i8", "fortran_order": False, "shape": (1 << 30, 1 << 20)}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("neighbours.npy", buffer.getvalue() + bytes(64))


@pytest.mark.parametrize("damage, shown", [
    (truncate, "not a readable neighbour file"),
    (rewrite_table(np.zeros((16, 1), np.int64)), "neighbour table of shape (16, 1)"),
    (rewrite_table(np.zeros((16, 4), np.float32)), "and type float32"),
    (rewrite_table(np.full((16, 4), 99, np.int64)), "names images outside the 16"),
    (declare_huge, "declares (1073741824, 1048576) int64"),
], ids=["truncated", "one-column", "floats", "out-of-range", "declared-huge"])
def test_a_damaged_neighbour_cache_is_one_line(damage, shown, tmp_path, camvid_features, head):
    cache = neighbours_path(TrainHeadSettings(features=camvid_features, out=head, clusters=11))
    damaged = copy(cache, tmp_path / "cache.npz")
    damage(damaged)
    line = cli_refuses(["head", "--features", camvid_features, "--out", tmp_path / "head.pt", "--clusters", 11,
                        "--code-dim", 8, "--epochs", 1, "--batch-size", 4, "--neighbours", 3,
                        "--feature-samples", 5, "--neg-samples", 2, "--neighbours-out", damaged])
    assert str(damaged) in line and shown in line, line
    assert not (tmp_path / "head.pt").exists()


# --- 5. options whose product exhausts memory -------------------------------------------------------------------

@pytest.mark.parametrize("options, shown", [
    (["--feature-samples", 1000], "--feature-samples 1000"),
    (["--code-dim", 10_000_000], "--code-dim 10000000"),
], ids=["feature-samples", "code-dim"])
def test_head_options_beyond_the_memory_bound_are_refused_before_training(options, shown, tmp_path,
                                                                          camvid_features):
    line = cli_refuses(["head", "--features", camvid_features, "--out", tmp_path / "head.pt", "--clusters", 11,
                        "--epochs", 1, *options])
    assert shown in line and "GiB of working memory" in line, line
    assert not list(tmp_path.iterdir())


def test_an_extract_batch_beyond_the_memory_bound_is_refused_and_a_large_batch_of_a_small_split_runs(camvid,
                                                                                                   tmp_path):
    line = cli_refuses(["extract", "--dataset", "camvid", "--root", camvid, "--split", "val", "--resolution", 896,
                        "--batch-size", 1000, "--out", tmp_path / "big.h5"])
    assert "--batch-size 1000 at --resolution 896" in line and "GiB of working memory" in line, line
    assert not list(tmp_path.iterdir())
    run_extract(ExtractSettings(dataset="camvid", root=str(camvid), split="val", backbone="dinov2_vits14_imgfocus",
                                out=tmp_path / "small.h5", resolution=112, batch_size=100_000, max_images=3),
                progress=False)
    assert (tmp_path / "small.h5").is_file()


def test_a_fit_step_beyond_the_memory_bound_is_refused(tmp_path, camvid_features, camvid_masks):
    line = cli_refuses(["fit", "--features", camvid_features, "--masks", camvid_masks, "--classes", 1_000_000,
                        "--out", tmp_path / "model.pt"])
    assert "--classes 1000000" in line and "GiB of working memory" in line, line
    assert not (tmp_path / "model.pt").exists()


# --- 6. split names, temporaries, one-line errors, a head of another resolution ---------------------------------

@pytest.mark.parametrize("split", ["../../x", "sub/train", ".hidden", "line\nbreak"])
def test_a_split_that_is_a_path_is_refused(split, tmp_path):
    root = tmp_path / "data"
    for folder in ("images", "labels", "splits"):
        (root / folder).mkdir(parents=True)
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "labels" / "a.png")
    (root / "classes.txt").write_text("road\n")
    (tmp_path / "x.txt").write_text("a\n")  # what splits/../../x.txt reaches, outside the root
    line = cli_refuses(["extract", "--dataset", "labelled_folder", "--root", root, "--split", split,
                        "--out", tmp_path / "out.h5"])
    assert "--split" in line and "a split is a name, not a path" in line, line
    assert not (tmp_path / "out.h5").exists()


def test_an_error_naming_a_file_with_a_newline_stays_one_line(tmp_path, camvid_features):
    path = tmp_path / "bad\nname.pt"
    path.write_bytes(b"not a checkpoint")
    line = cli_refuses(["evaluate", "--model", path, "--features", camvid_features, "--out", tmp_path / "report"])
    assert "bad\\nname.pt" in line, line


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "history.json"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = temporary_sibling(target).with_name(temporary_sibling(target).name.rsplit("-", 1)[0] + f"-{dead.pid}")
    stale.write_bytes(b"half a file")
    live = temporary_sibling(target).with_name(temporary_sibling(target).name.rsplit("-", 1)[0] + f"-{os.getppid()}")
    live.write_bytes(b"another writer's file")
    write_json_atomic(target, {"epoch": 1})
    assert not stale.exists() and live.exists() and target.is_file()


def test_a_fit_rerun_after_a_kill_during_the_history_write_leaves_no_temporary(tmp_path, camvid_features,
                                                                               camvid_masks):
    settings = FitSettings(features=camvid_features, masks=camvid_masks, classes=11, out=tmp_path / "model.pt",
                           epochs=1, overrides={"batch_size": 8, "init_samples": 2000, "kmeans_iterations": 5})
    figure = history_path(settings).with_suffix(".png")
    stale = temporary_sibling(figure).with_name(temporary_sibling(figure).name.rsplit("-", 1)[0] + "-999999999")
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"\x89PNG half")
    run_fit(settings, progress=False)
    assert figure.is_file() and not [path for path in tmp_path.iterdir() if ".tmp-" in path.name]


def test_fit_refuses_a_head_trained_on_features_of_another_resolution(tmp_path, camvid, head):
    other = tmp_path / "features_280.h5"
    run_extract(ExtractSettings(dataset="camvid", root=str(camvid), split="val", backbone="dinov2_vits14_imgfocus",
                                out=other, resolution=280, batch_size=4, max_images=2), progress=False)
    run_propose(ProposeSettings(features=other, out=tmp_path / "masks_280", crf=None), progress=False)
    line = cli_refuses(["fit", "--features", other, "--masks", tmp_path / "masks_280", "--classes", 11,
                        "--head", head, "--out", tmp_path / "model.pt"])
    assert "features do not match the ones head" in line and "resolution (head: 224, features: 280)" in line, line
    assert not (tmp_path / "model.pt").exists()
