"""Faults and bad input, built on real data: full disks, damaged caches, every image mode, EXIF orientation,
worker loss, hostile names, lost provenance and degenerate settings.

Each test asserts what a user sees (one `Error:` line naming the file, the exit status) and that nothing
published is wrong (no final file, no file outside `--out`, a rerun that ends where a clean run ends).
Disk-full is real where the OS can give it cheaply (a file-size limit, `ulimit -f`, in a subprocess) and
injected at the library boundary otherwise (h5py, pathlib, os.fsync raising the OSError a full disk raises).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.backbones.imgfocus import find_onnx, load_imgfocus_state_dict
from pipeline.cli import main
from pipeline.data.base import read_rgb_image
from pipeline.data.transforms import prepare_crop
from pipeline.errors import PipelineError
from pipeline.store import masks as mask_store
from pipeline.store.features import FeatureFile, partial_path
from stages.extract import ExtractSettings, run_extract
from stages.fit import FitSettings, baseline_path, history_path, run_fit
from stages.predict import PredictSettings, run_predict
from stages.propose import ProposeSettings, run_propose

BACKBONE = "dinov2_vits14_imgfocus"
REPOSITORY = Path(__file__).resolve().parents[1]


# --- helpers --------------------------------------------------------------------------------------------------


def cli_refuses(arguments: list, code: int = 1) -> str:
    """Run the CLI in this process; it must end with exactly one `Error:` line and `code`, not a traceback."""
    result = CliRunner().invoke(main, [str(argument) for argument in arguments])
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{result.output}"
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def cli_in_subprocess(arguments: list, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """`primaps-pipeline ARGS` as a separate process, optionally under a file-size limit (`ulimit -f`): writes past
    it fail with EFBIG, as writes to a full disk fail with ENOSPC."""
    limit = "" if file_size_limit is None else (
        f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, {file_size_limit})); ")
    code = f"{limit}import sys; from pipeline.cli import main; sys.argv[0] = 'primaps-pipeline'; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, arguments)], capture_output=True, text=True,
                          cwd=REPOSITORY, timeout=600)


def one_error_line(completed: subprocess.CompletedProcess) -> str:
    """The last stderr line of a process that must have failed cleanly: exit 1, no traceback."""
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), completed.stderr[-3000:]
    return last


def datasets_of(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as handle:
        content = {name: handle[name][...] for name in handle}
        content["provenance"] = json.loads(handle.attrs["provenance"])
    return content


def assert_same_feature_file(expected: Path, actual: Path) -> None:
    reference, candidate = datasets_of(expected), datasets_of(actual)
    assert set(reference) == set(candidate)
    for name in reference:
        if name == "provenance":
            assert reference[name] == candidate[name]
        else:
            assert np.array_equal(reference[name], candidate[name]), name


def pngs(directory: Path) -> dict[str, bytes]:
    return {path.relative_to(directory).as_posix(): path.read_bytes() for path in sorted(directory.rglob("*.png"))}


def copy_masks(masks: Path, to: Path) -> Path:
    shutil.copytree(masks, to)
    return to


def propose_refuses(features: Path, out: Path) -> str:
    """`propose` on a damaged feature file: one `Error:` line, and no mask directory made."""
    line = cli_refuses(["propose", "--features", features, "--out", out])
    assert not out.exists()
    return line


def copy_features(features: Path, to: Path) -> Path:
    shutil.copyfile(features, to)
    return to


def small_extract(root: Path, out: Path, **changes) -> ExtractSettings:
    """6 real CamVid images at 112² with one augmented view, in batches of 2 (3 batches)."""
    return replace(ExtractSettings(dataset="camvid", root=str(root), split="val", backbone=BACKBONE, out=out,
                                   resolution=112, batch_size=2, max_images=6, views=1), **changes)


@pytest.fixture(scope="module")
def clean_extract(camvid, tmp_path_factory) -> Path:
    """What an undisturbed `extract` of `small_extract` publishes: the reference every faulty run must reach."""
    out = tmp_path_factory.mktemp("clean") / "val.h5"
    run_extract(small_extract(camvid, out), progress=False)
    return out


@pytest.fixture(scope="module")
def model(camvid_features, camvid_masks, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "model.pt"
    run_fit(FitSettings(features=camvid_features, masks=camvid_masks, classes=11, out=out, epochs=1,
                        overrides={"batch_size": 4, "init_samples": 2000, "kmeans_iterations": 5}), progress=False)
    return out


def failing_from_call(function, nth: int, code: int = errno.ENOSPC):
    """`function`, except that its `nth` call (1-based) and every later one raise the OSError a full (ENOSPC) or
    broken (EIO) disk gives: a fault injected at the library boundary."""
    calls = 0

    @functools.wraps(function)
    def failing(*arguments, **keywords):
        nonlocal calls
        calls += 1
        if calls >= nth:
            raise OSError(code, os.strerror(code))
        return function(*arguments, **keywords)

    return failing


# --- 1. a full disk never publishes a corrupt cache -------------------------------------------------------------


def test_extract_past_the_file_size_limit_publishes_nothing_and_resumes(camvid, clean_extract, tmp_path):
    """A real write limit (ulimit -f, what a full disk does to a growing file): one line, exit 1, the partial
    file stays partial and readable, and the rerun resumes to exactly the clean file."""
    out = tmp_path / "val.h5"
    command = ["extract", "--dataset", "camvid", "--root", camvid, "--split", "val", "--backbone", BACKBONE,
               "--resolution", "112", "--batch-size", "2", "--max-images", "6", "--views", "1", "--out", out]
    line = one_error_line(cli_in_subprocess(command, file_size_limit=1_900_000))
    assert str(partial_path(out)) in line and "[Errno 27] File too large" in line and "nothing was published" in line
    assert not out.exists() and partial_path(out).exists()
    with h5py.File(partial_path(out), "r") as handle:
        done_before = int(handle["done"][:].sum())
    assert 0 < done_before < 6
    summary = run_extract(small_extract(camvid, out), progress=False)
    assert summary.extracted == 6 - done_before and not summary.restarted
    assert_same_feature_file(clean_extract, out)


def test_a_failing_hdf5_write_is_one_line_and_the_rerun_resumes(camvid, clean_extract, tmp_path, monkeypatch):
    """ENOSPC from h5py half-way through the second batch (its crops written, its tokens not)."""
    out = tmp_path / "val.h5"
    monkeypatch.setattr(h5py.Dataset, "__setitem__", failing_from_call(h5py.Dataset.__setitem__, nth=9))
    with pytest.raises(PipelineError, match=r"val\.h5\.partial: write failed \(\[Errno 28\] No space left on device\); "
                                            r"nothing was published"):
        run_extract(small_extract(camvid, out), progress=False)
    monkeypatch.undo()
    assert not out.exists() and partial_path(out).exists()
    summary = run_extract(small_extract(camvid, out), progress=False)
    assert summary.extracted == 4 and not summary.restarted
    assert_same_feature_file(clean_extract, out)


def test_a_damaged_partial_file_is_started_over(camvid, clean_extract, tmp_path, monkeypatch):
    """A partial file that a failed write left unreadable (here: cut in half) is extracted again from scratch."""
    out = tmp_path / "val.h5"
    monkeypatch.setattr(h5py.Dataset, "__setitem__", failing_from_call(h5py.Dataset.__setitem__, nth=16))
    with pytest.raises(PipelineError, match="write failed"):
        run_extract(small_extract(camvid, out), progress=False)
    monkeypatch.undo()
    data = partial_path(out).read_bytes()
    partial_path(out).write_bytes(data[: len(data) // 2])
    summary = run_extract(small_extract(camvid, out), progress=False)
    assert summary.restarted and summary.extracted == 6 and "started over" in summary.line()
    assert_same_feature_file(clean_extract, out)


def test_a_file_whose_data_did_not_reach_the_disk_is_not_published(camvid, clean_extract, tmp_path, monkeypatch):
    """fsync reports the write-back error (EIO) that close() and the rename would hide."""
    out = tmp_path / "val.h5"
    monkeypatch.setattr(os, "fsync", failing_from_call(os.fsync, nth=1, code=errno.EIO))
    with pytest.raises(PipelineError, match=r"val\.h5\.partial: write failed \(\[Errno 5\] Input/output error\)"):
        run_extract(small_extract(camvid, out), progress=False)
    monkeypatch.undo()
    assert not out.exists()
    assert run_extract(small_extract(camvid, out), progress=False).extracted == 0
    assert_same_feature_file(clean_extract, out)


def test_full_disk_during_propose_is_one_line_and_the_rerun_is_exact(camvid_features, camvid_masks, tmp_path,
                                                                      monkeypatch):
    """The disk fills after the provenance record and 5 PNGs: the other PNGs are recorded as failed, the final
    index write fails with one line, and the rerun completes to the masks of a clean run."""
    out = tmp_path / "masks"
    monkeypatch.setattr(Path, "write_bytes", failing_from_call(Path.write_bytes, nth=7))
    line = cli_refuses(["propose", "--features", camvid_features, "--out", out])
    monkeypatch.undo()
    assert line == f"Error: {out / 'index.jsonl'}: cannot write ([Errno 28] No space left on device); " \
                   "nothing was published there"
    assert len(pngs(out)) == 5
    records = mask_store.read_index(out)  # the index the run appended to is still there, all 16 images in it
    assert len(records) == 16 and sum(record.status == "ok" for record in records.values()) == 5
    summary = run_propose(ProposeSettings(features=camvid_features, out=out), progress=False)
    assert summary.computed == 11 and not summary.failed
    assert pngs(out) == pngs(camvid_masks)


def test_a_checkpoint_that_cannot_be_written_names_the_file_and_the_os_error(camvid_features, camvid_masks, model,
                                                                            tmp_path):
    """torch's own writer only says "unexpected pos"; the one line names the checkpoint and EFBIG, and the rerun
    with room fits the same model as a run that never failed (the `model` fixture, same settings)."""
    out = tmp_path / "model.pt"
    command = ["fit", "--features", camvid_features, "--masks", camvid_masks, "--classes", "11", "--epochs", "1",
               "--set", "batch_size=4", "--set", "init_samples=2000", "--set", "kmeans_iterations=5", "--out", out]
    line = one_error_line(cli_in_subprocess(command, file_size_limit=6000))
    assert line.startswith(f"Error: {tmp_path / 'model.baseline.pt'}: cannot write ([Errno 27] File too large)")
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob(".*"))
    result = CliRunner().invoke(main, [str(argument) for argument in command])
    assert result.exit_code == 0, result.output
    fitted, expected = torch.load(out, weights_only=True), torch.load(model, weights_only=True)
    assert torch.equal(fitted["init"], expected["init"]) and fitted["history"] == expected["history"]
    for role in ("momentum", "running"):
        assert all(torch.equal(fitted[role][key], expected[role][key]) for key in expected[role])


# --- 2. images are decoded by their real range, and turned as every viewer turns them ---------------------------


def png_16bit_rgb(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG (Pillow cannot write one): signature, IHDR, one IDAT of filter-0 rows, IEND."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def photo(camvid) -> np.ndarray:
    """A real 8-bit RGB street photo (a 96×128 corner of a CamVid image)."""
    with Image.open(sorted((camvid / "val").glob("*.png"))[0]) as image:
        return np.asarray(image.convert("RGB"))[100:196, 50:178].copy()


def mode_file(kind: str, rgb: np.ndarray, directory: Path) -> tuple[Path, np.ndarray]:
    """The photo stored as `kind` (an image mode and format), and the 8-bit RGB it stands for."""
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    as_rgb = np.repeat(grey[..., None], 3, axis=2)
    path = directory / kind
    if kind in ("I16.png", "I16.tif"):
        Image.fromarray(grey.astype(np.uint16) * 257).save(path)
    elif kind == "I32.tif":
        Image.fromarray(grey.astype(np.int32) * 257).save(path)
    elif kind == "F.tif":
        Image.fromarray(grey.astype(np.float32) / 255).save(path)
    elif kind == "F255.tif":
        Image.fromarray(grey.astype(np.float32)).save(path)
    elif kind == "LA.png":
        Image.fromarray(np.dstack([grey, np.zeros_like(grey)])).save(path)
    elif kind == "1.png":
        Image.fromarray(grey > 128).save(path)
        as_rgb = np.where(as_rgb > 128, 255, 0).astype(np.uint8)
    elif kind == "RGB16.png":
        png_16bit_rgb(path, rgb.astype(np.uint16) * 257)
        as_rgb = rgb
    elif kind == "RGBA.png":
        Image.fromarray(np.dstack([rgb, np.full(grey.shape, 128, np.uint8)])).save(path)
        as_rgb = rgb
    elif kind == "P-transparent.png":
        palette = Image.fromarray(rgb).quantize(64)
        palette.save(path, transparency=0)
        as_rgb = np.asarray(palette.convert("RGB"))
    elif kind == "CMYK.tif":
        Image.fromarray(rgb).convert("CMYK").save(path)
        as_rgb = np.asarray(Image.fromarray(rgb).convert("CMYK").convert("RGB"))
    return path, as_rgb


MODES = ("I16.png", "I16.tif", "I32.tif", "F.tif", "F255.tif", "RGB16.png", "RGBA.png", "LA.png",
         "P-transparent.png", "CMYK.tif", "1.png")


@pytest.mark.parametrize("kind", MODES)
def test_every_image_mode_becomes_8_bit_rgb_by_its_real_range(photo, kind, tmp_path):
    """On the code this replaced, 16-bit grey came out white, float grey black and 32-bit grey clipped."""
    path, expected = mode_file(kind, photo, tmp_path)
    decoded = read_rgb_image(path)
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), expected)


@pytest.mark.parametrize(("values", "reason"), [
    (np.full((8, 8), np.nan, np.float32), "it holds NaN or infinite values"),
    (np.full((8, 8), 300.0, np.float32), r"values span 300\.\.300, expected 0\.\.1 or 0\.\.255"),
    (np.full((8, 8), -5, np.int32), r"values span -5\.\.-5, expected 0\.\.65535"),
])
def test_images_outside_their_mode_range_are_refused_in_one_line(values, reason, tmp_path):
    Image.fromarray(values).save(tmp_path / "odd.tif")
    with pytest.raises(PipelineError, match=f"odd\\.tif: cannot read image \\({reason}\\)"):
        read_rgb_image(tmp_path / "odd.tif")


def test_extract_caches_a_16_bit_or_float_photo_as_its_8_bit_twin(photo, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    twin = np.asarray(Image.fromarray(photo).convert("L"))
    Image.fromarray(twin).save(folder / "a_8bit.png")
    for kind in ("I16.png", "F.tif"):
        mode_file(kind, photo, folder)
    out = tmp_path / "photos.h5"
    run_extract(ExtractSettings(dataset="folder", root=str(folder), split="all", backbone="dino_vits16",
                                random_init=True, resolution=32, out=out), progress=False)
    with FeatureFile(out) as features:
        assert features.names == ["F", "I16", "a_8bit"]
        crops = [features.crop(index) for index in range(3)]
    assert crops[2].std() > 10
    np.testing.assert_array_equal(crops[0], crops[2])
    np.testing.assert_array_equal(crops[1], crops[2])


def save_rotated_by_exif(photo: np.ndarray, path: Path) -> None:
    """Store the photo's pixels with EXIF orientation 6: "rotate 90° clockwise to view"."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo).save(path, exif=exif)


def test_exif_orientation_is_applied_to_photos_and_predict_but_not_to_labelled_data(photo, model, tmp_path):
    viewed = np.rot90(photo, k=-1)  # what every viewer shows for orientation 6
    save_rotated_by_exif(photo, tmp_path / "phone.png")
    np.testing.assert_array_equal(np.asarray(read_rgb_image(tmp_path / "phone.png", apply_orientation=True)), viewed)
    np.testing.assert_array_equal(np.asarray(read_rgb_image(tmp_path / "phone.png")), photo)

    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(tmp_path / "phone.png", folder / "phone.png")
    run_extract(ExtractSettings(dataset="folder", root=str(folder), split="all", backbone="dino_vits16",
                                random_init=True, resolution=48, out=tmp_path / "photos.h5"), progress=False)
    with FeatureFile(tmp_path / "photos.h5") as features:
        np.testing.assert_array_equal(features.crop(0), prepare_crop(Image.fromarray(viewed), 48))

    labelled = tmp_path / "labelled"
    (labelled / "images").mkdir(parents=True)
    (labelled / "labels").mkdir()
    shutil.copy(tmp_path / "phone.png", labelled / "images" / "phone.png")
    Image.fromarray(np.zeros(photo.shape[:2], np.uint8)).save(labelled / "labels" / "phone.png")
    (labelled / "classes.txt").write_text("road\n")
    run_extract(ExtractSettings(dataset="labelled_folder", root=str(labelled), split="all", backbone="dino_vits16",
                                random_init=True, resolution=48, out=tmp_path / "labelled.h5"), progress=False)
    with FeatureFile(tmp_path / "labelled.h5") as features:
        np.testing.assert_array_equal(features.crop(0), prepare_crop(Image.fromarray(photo), 48))

    run_predict(PredictSettings(model=model, images=(tmp_path / "phone.png",), out=tmp_path / "out", device="cpu"),
                progress=False)
    assert np.asarray(Image.open(tmp_path / "out" / "phone.png")).shape == viewed.shape[:2]


# --- 3. damaged caches are refused in one line naming the file and the image -------------------------------------


def test_non_finite_features_are_refused_naming_the_file_and_the_image(camvid_features, camvid_masks, tmp_path):
    damaged = copy_features(camvid_features, tmp_path / "damaged.h5")
    with h5py.File(damaged, "r+") as handle:
        name = handle["names"][5].decode()
        handle["features"][5, 2, 3] = np.inf
    line = cli_refuses(["fit", "--features", damaged, "--masks", camvid_masks, "--classes", "11", "--epochs", "1",
                        "--set", "init_samples=2000", "--out", tmp_path / "model.pt"])
    assert line == (f"Error: {damaged}: image '{name}': features hold NaN or infinite values; the file is damaged, "
                    "rerun extract with --overwrite")
    assert not list(tmp_path.glob("*.pt"))


def shorten(handle: h5py.File, name: str) -> None:
    values = handle[name][:-1]
    del handle[name]
    handle.create_dataset(name, data=values)


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda handle: handle.__delitem__("crops"), "no crops dataset"),
    (lambda handle: shorten(handle, "skipped"), "skipped holds 15 entries for 16 images"),
    (lambda handle: handle["done"].__setitem__(2, False), "1 images not done"),
])
def test_a_feature_file_that_is_not_whole_is_refused(damage, problem, camvid_features, tmp_path):
    damaged = copy_features(camvid_features, tmp_path / "damaged.h5")
    with h5py.File(damaged, "r+") as handle:
        damage(handle)
    line = propose_refuses(damaged, tmp_path / "masks")
    assert line == f"Error: {damaged}: not a complete primaps-pipeline feature file ({problem})"


def test_a_feature_file_without_provenance_is_refused(camvid_features, tmp_path):
    damaged = copy_features(camvid_features, tmp_path / "damaged.h5")
    with h5py.File(damaged, "r+") as handle:
        del handle.attrs["provenance"]
    line = propose_refuses(damaged, tmp_path / "masks")
    assert line == f"Error: {damaged}: has no readable provenance record; rerun extract with --overwrite"


def test_a_mask_of_another_size_is_refused_by_fit_naming_the_png_and_the_image(camvid_features, camvid_masks,
                                                                                tmp_path):
    masks = copy_masks(camvid_masks, tmp_path / "masks")
    with FeatureFile(camvid_features) as features:
        name = features.names[4]
    Image.fromarray(np.ones((100, 100), np.uint8)).save(masks / f"{name}.png")
    command = ["fit", "--features", camvid_features, "--masks", masks, "--classes", "11", "--epochs", "1",
               "--set", "init_samples=2000", "--set", "kmeans_iterations=5", "--out", tmp_path / "model.pt"]
    line = cli_refuses(command)
    assert line.startswith(f"Error: {masks / name}.png: image '{name}': the PNG does not match its record")
    # even when someone also rewrote its record to match, the size is checked against the crop size
    records = mask_store.read_index(masks)
    records[name] = replace(records[name], masks=1,
                            png_sha256=hashlib.sha256((masks / f"{name}.png").read_bytes()).hexdigest())
    mask_store.write_index(masks, records.values())
    line = cli_refuses(command)
    assert line.startswith(f"Error: {masks / name}.png: image '{name}': mask is L 100×100, expected L 224×224")
    assert not (tmp_path / "model.pt").exists()


def test_propose_recomputes_a_mask_png_that_no_longer_matches_its_record(camvid_features, camvid_masks, tmp_path):
    masks = copy_masks(camvid_masks, tmp_path / "masks")
    with FeatureFile(camvid_features) as features:
        name = features.names[7]
    Image.fromarray(np.full((224, 224), 255, np.uint8)).save(masks / f"{name}.png")  # a blank mask
    summary = run_propose(ProposeSettings(features=camvid_features, out=masks), progress=False)
    assert summary.computed == 1 and not summary.failed
    assert pngs(masks) == pngs(camvid_masks)
    clean, fixed = mask_store.read_index(camvid_masks)[name], mask_store.read_index(masks)[name]
    assert (fixed.masks, fixed.coverage, fixed.png_sha256) == (clean.masks, clean.coverage, clean.png_sha256)


def test_an_index_record_of_the_wrong_type_is_refused_in_one_line(camvid_features, camvid_masks, tmp_path):
    masks = copy_masks(camvid_masks, tmp_path / "masks")
    with FeatureFile(camvid_features) as features:
        name = features.names[0]
    index = masks / "index.jsonl"
    with index.open("a") as stream:
        stream.write(json.dumps({"name": name, "status": "ok", "masks": "many"}) + "\n")
    before = index.read_bytes()
    expected = f"Error: {index}: line 17 (image '{name}'): 'masks' is \"many\", not a valid value"
    assert cli_refuses(["propose", "--features", camvid_features, "--out", masks]).startswith(expected)
    assert cli_refuses(["inspect", "--features", camvid_features, "--masks", masks, "--out", tmp_path / "look"]
                       ).startswith(expected)
    assert index.read_bytes() == before


# --- 4. degenerate settings are refused with the option's name and its range -------------------------------------


@pytest.mark.parametrize(("command", "option", "value", "shown"), [
    ("propose", "--psi", "1.5", "0<x<=1"),
    ("propose", "--psi", "0.0", "0<x<=1"),
    ("propose", "--stop-fraction", "1.5", "0<x<=1"),
    ("propose", "--crf-iterations", "-1", "x>=0"),
    ("propose", "--workers", "0", "x>=1"),
    ("propose", "--timeout", "0.0", "x>0"),
    ("fit", "--epochs", "0", "x>=1"),
    ("fit", "--epochs", "-1", "x>=1"),
    ("extract", "--batch-size", "0", "x>=1"),
    ("evaluate", "--workers", "0", "x>=1"),
    ("head", "--batch-size", "1", "x>=2"),
    ("head", "--neighbours", "0", "x>=1"),
    ("head", "--learning-rate", "0.0", "x>0"),
])
def test_out_of_range_options_are_refused_with_the_allowed_range(command, option, value, shown, tmp_path):
    required = {"propose": ["--features", tmp_path / "f.h5", "--out", tmp_path / "m"],
                "fit": ["--features", tmp_path / "f.h5", "--masks", tmp_path / "m", "--classes", "3",
                        "--out", tmp_path / "model.pt"],
                "extract": ["--dataset", "sample", "--out", tmp_path / "f.h5"],
                "evaluate": ["--model", tmp_path / "model.pt", "--features", tmp_path / "f.h5",
                             "--out", tmp_path / "e"],
                "head": ["--features", tmp_path / "f.h5", "--out", tmp_path / "head.pt", "--clusters", "3"]}
    line = cli_refuses([command, *required[command], option, value], code=2)
    assert line == f"Error: Invalid value for '{option}': {value} is not in the range {shown}."


@pytest.mark.parametrize("assignment, shown", [
    ("batch_size=0", "--set batch_size=0: must be at least 1"),
    ("learning_rate=0", "--set learning_rate=0.0: must be above 0"),
    ("vote=equal", "--set vote=equal: must be one of majority, transport, restore"),
    ("learning_rat=0.1", "--set learning_rat: not a recipe key; choose one of learning_rate, "),
    ("teacher_fallback=maybe", "--set teacher_fallback=maybe: teacher_fallback takes a bool"),
    ("learning_rate", "--set learning_rate: expected KEY=VALUE"),
])
def test_a_bad_recipe_key_or_value_is_refused_in_one_line(assignment, shown, tmp_path):
    line = cli_refuses(["fit", "--features", tmp_path / "f.h5", "--masks", tmp_path / "m", "--classes", "3",
                        "--out", tmp_path / "model.pt", "--set", assignment], code=2)
    assert line.startswith(f"Error: Invalid value for '--set': {shown}")


def test_out_of_range_params_yaml_keys_and_settings_are_refused(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("propose:\n  psi: 1.5\n")
    line = cli_refuses(["propose", "--params", params, "--features", tmp_path / "f.h5", "--out", tmp_path / "m"], 2)
    assert line == f"Error: Invalid value for '--params': {params}: psi: 1.5 is not in the range 0<x<=1."
    with pytest.raises(PipelineError, match=r"^--psi 1\.5: must lie in \(0, 1\]$"):
        ProposeSettings(features=tmp_path / "f.h5", out=tmp_path / "m", psi=1.5)
    params.write_text("fit:\n  set:\n    batch_size: 0\n")
    line = cli_refuses(["fit", "--params", params, "--features", tmp_path / "f.h5", "--masks", tmp_path / "m",
                        "--classes", "3", "--out", tmp_path / "model.pt"], 2)
    assert line == "Error: Invalid value for '--set': --set batch_size=0: must be at least 1"
    with pytest.raises(PipelineError, match=r"^--epochs 0: must be at least 1$"):
        FitSettings(features=tmp_path / "f.h5", masks=tmp_path / "m", classes=3, out=tmp_path / "m.pt", epochs=0)
    with pytest.raises(PipelineError, match=r"^--set logits=cos: must be one of raw, cosine$"):
        FitSettings(features=tmp_path / "f.h5", masks=tmp_path / "m", classes=3, out=tmp_path / "m.pt",
                    overrides={"logits": "cos"})
    with pytest.raises(PipelineError, match=r"^--set learning_rat: not a recipe key; choose one of learning_rate, "):
        FitSettings(features=tmp_path / "f.h5", masks=tmp_path / "m", classes=3, out=tmp_path / "m.pt",
                    overrides={"learning_rat": 0.1})
    with pytest.raises(PipelineError, match=r"^--recipe papr: unknown recipe; choose one of paper, tuned, head, anchored$"):
        FitSettings(features=tmp_path / "f.h5", masks=tmp_path / "m", classes=3, out=tmp_path / "m.pt", recipe="papr")


def test_skip_bad_with_no_readable_image_publishes_nothing(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "photos.h5"
    line = cli_refuses(["extract", "--dataset", "folder", "--root", folder, "--backbone", "dino_vits16",
                        "--random-init", "--resolution", "32", "--skip-bad", "--out", out])
    assert line.startswith(f"Error: {out}: none of the 2 images could be read (first: {folder / 'a.png'}: cannot read")
    assert line.endswith("nothing was published")
    assert not out.exists() and not partial_path(out).exists()


# --- 5. a pool that times out or loses its workers records the unfinished images ---------------------------------


def test_a_pool_timeout_records_every_unfinished_image_and_the_rerun_completes(camvid_features, camvid_masks,
                                                                               tmp_path):
    out = tmp_path / "masks"
    result = CliRunner().invoke(main, ["propose", "--features", str(camvid_features), "--out", str(out),
                                       "--timeout", "0.01", "--workers", "2"])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == f"Error: {out}: 16 images failed; rerun to retry them"
    assert {record.status for record in mask_store.read_index(out).values()} <= {"timeout", "failed"}
    assert run_propose(ProposeSettings(features=camvid_features, out=out, workers=2), progress=False).computed == 16
    assert pngs(out) == pngs(camvid_masks)


@pytest.mark.parametrize(("backend", "worker_marker"), [("loky", "LokyProcess"), ("dask", "spawn_main")])
def test_losing_every_worker_records_the_unfinished_images_and_the_rerun_completes(backend, worker_marker,
                                                                                   camvid_features, camvid_masks,
                                                                                   tmp_path):
    """kill -9 every worker process once two masks exist (for Dask, while its nannies try to restart them)."""
    out = tmp_path / "masks"
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr_file:
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "propose", "--features", str(camvid_features),
                                    "--out", str(out), "--workers", "2", "--backend", backend],
                                   stdout=subprocess.DEVNULL, stderr=stderr_file, cwd=REPOSITORY)
    deadline = time.monotonic() + 180
    while len(list(out.glob("*.png"))) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    workers = [child for child in psutil.Process(process.pid).children(recursive=True)
               if worker_marker in " ".join(child.cmdline())]
    assert workers, "no worker processes found"
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
    process.wait(timeout=300)
    stderr = log.read_text()
    assert process.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: {out}: ") and last.endswith("images failed; rerun to retry them")
    failed = [record for record in mask_store.read_index(out).values() if record.status != "ok"]
    assert failed and all(f"{backend} pool: the worker pool failed" in record.error for record in failed)
    summary = run_propose(ProposeSettings(features=camvid_features, out=out), progress=False)
    assert summary.computed == len(failed) and not summary.failed
    assert pngs(out) == pngs(camvid_masks)


# --- 6. names from a feature file never lead outside --out --------------------------------------------------------


HOSTILE_NAMES = ("../../escaped", "{outside}/absolute", "sub//double", "sub/./dot", "bell\x07", "rtl\u202eoverride",
                 "back\\slash", ".hidden", "x" * 201)


@pytest.mark.parametrize("hostile", HOSTILE_NAMES)
def test_hostile_image_names_in_a_shared_feature_file_are_refused(hostile, camvid_features, camvid_masks, tmp_path):
    hostile = hostile.format(outside=tmp_path / "outside")
    shared = copy_features(camvid_features, tmp_path / "shared.h5")
    with h5py.File(shared, "r+") as handle:
        handle["names"][3] = hostile
    deep = tmp_path / "a" / "b"
    for command in (["propose", "--features", shared, "--out", deep / "masks"],
                    ["inspect", "--features", shared, "--masks", camvid_masks, "--out", deep / "look"],
                    ["report", "--features", shared, "--masks", camvid_masks, "--model", deep / "model.pt",
                     "--metrics", tmp_path, "--out", deep / "report"]):
        line = cli_refuses(command)
        assert line.startswith(f"Error: {shared}: image name {hostile!r} ") and "refusing" in line
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert written == [shared]


@pytest.mark.parametrize(("first", "second"), [("Road_001", "road_001"), ("caf\u00e9", "cafe\u0301")])
def test_names_that_would_share_a_file_are_refused(first, second, camvid_features, tmp_path):
    """Equal on a case-insensitive or Unicode-normalising file system (macOS, Windows)."""
    shared = copy_features(camvid_features, tmp_path / "shared.h5")
    with h5py.File(shared, "r+") as handle:
        handle["names"][0], handle["names"][1] = first, second
    line = propose_refuses(shared, tmp_path / "masks")
    assert line == f"Error: {shared}: image names {first!r} and {second!r} would name the same file"


def test_names_with_sub_folders_still_map_to_sub_folders(camvid_features, tmp_path):
    nested = copy_features(camvid_features, tmp_path / "nested.h5")
    with h5py.File(nested, "r+") as handle:
        names = [name.decode() for name in handle["names"][:]]
        for index, name in enumerate(names):
            handle["names"][index] = f"city{index % 2}/{name}"
    run_propose(ProposeSettings(features=nested, out=tmp_path / "masks", crf=None), progress=False)
    assert sorted(pngs(tmp_path / "masks")) == sorted(f"city{i % 2}/{name}.png" for i, name in enumerate(names))


def test_predict_refuses_images_whose_outputs_would_overwrite_each_other(camvid, model, tmp_path):
    photo = sorted((camvid / "val").glob("*.png"))[0]
    for name in ("a.png", "a_overlay.png"):
        shutil.copy(photo, tmp_path / name)
    with pytest.raises(PipelineError, match=r"a_overlay\.png: its output a_overlay\.png would overwrite the one of "
                                            r".*a\.png; rename one of them"):
        run_predict(PredictSettings(model=model, images=(tmp_path / "a.png", tmp_path / "a_overlay.png"),
                                    out=tmp_path / "out", device="cpu"), progress=False)
    assert not (tmp_path / "out").exists()


# --- 7. outputs whose provenance is lost are never re-stamped; what belongs together is checked together ---------


def test_a_mask_directory_that_lost_its_provenance_is_refused(camvid_features, camvid_masks, tmp_path):
    masks = copy_masks(camvid_masks, tmp_path / "masks")
    (masks / "provenance.json").unlink()
    before = pngs(masks)
    line = cli_refuses(["propose", "--features", camvid_features, "--out", masks, "--psi", "0.5", "--no-crf"])
    assert line == (f"Error: {masks}: holds masks but no provenance.json, so what made them is unknown; "
                    "rerun with --overwrite to recompute them all")
    assert pngs(masks) == before and not (masks / "provenance.json").exists()
    summary = run_propose(ProposeSettings(features=camvid_features, out=masks, overwrite=True), progress=False)
    assert summary.computed == 16 and pngs(masks) == pngs(camvid_masks)


def test_a_damaged_baseline_beside_a_finished_model_is_rewritten_from_it(camvid_features, camvid_masks, tmp_path):
    settings = FitSettings(features=camvid_features, masks=camvid_masks, classes=11, out=tmp_path / "model.pt",
                           epochs=1, overrides={"batch_size": 4, "init_samples": 2000, "kmeans_iterations": 5})
    run_fit(settings, progress=False)
    baseline, history = baseline_path(settings), history_path(settings)
    original = baseline.read_bytes(), history.read_bytes()
    baseline.write_bytes(original[0][:1000])
    history.unlink()
    summary = run_fit(settings, progress=False)
    assert summary.epochs_run == 0 and summary.restored == [baseline, history]
    assert (baseline.read_bytes(), history.read_bytes()) == original
    assert run_fit(settings, progress=False).restored == []


def test_a_truncated_converted_weights_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIMAPS_CACHE_DIR", str(tmp_path))
    state, _ = load_imgfocus_state_dict(find_onnx())
    (cached,) = tmp_path.glob("*.pt")
    cached.write_bytes(cached.read_bytes()[:4096])
    rebuilt, _ = load_imgfocus_state_dict(find_onnx())
    assert rebuilt.keys() == state.keys() and all(torch.equal(rebuilt[key], state[key]) for key in state)
    reread, _ = load_imgfocus_state_dict(find_onnx())
    assert all(torch.equal(reread[key], state[key]) for key in state)


def test_a_corrupt_weights_file_in_predict_is_one_line(camvid, model, tmp_path):
    weights = tmp_path / "vit_s_focus.onnx"
    weights.write_bytes(b"not an ONNX graph \xff\xfe")
    photo = sorted((camvid / "val").glob("*.png"))[0]
    line = cli_refuses(["predict", "--model", model, "--weights", weights, "--out", tmp_path / "out", photo])
    assert line.startswith(f"Error: {weights}: not a readable ONNX file (")
    assert not (tmp_path / "out").exists()
