"""STEGO / HP heads: the correlation loss, the head's forward, KNN pairs, released checkpoints (crafted in the
official layouts), resumable head training, and PriMaPs-EM on code features."""

from __future__ import annotations

import collections
import os
import sys
import types
from dataclasses import asdict, replace
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.backbones import build_backbone
from pipeline.backbones.checkpoint import tensors_fingerprint
from pipeline.em import EMConfig, PrimapsEM, Prototypes
from pipeline.em.config import RECIPES
from pipeline.errors import PipelineError
from pipeline.heads import build_head
from pipeline.heads.foreign import read_hp_checkpoint, read_stego_checkpoint
from pipeline.heads.neighbours import global_descriptor, nearest_images
from pipeline.heads.stego import SegmentationHead
from pipeline.heads.stego_loss import correlation_term, random_partners
from pipeline.metrics import SegmentationEvaluator
from pipeline.segmenter import Segmenter, load_segmenter
from pipeline.store.checkpoints import load_checkpoint
from pipeline.store.features import FeatureFile
from stages.extract import ExtractSettings, run_extract

from stages.head import ImportHeadSettings, TrainHeadSettings, run_import_head, run_train_head
from tests.test_em import CROP, K, PlantedScenes

# --- the loss ---------------------------------------------------------------------------------------------

def test_correlation_term_on_a_hand_computed_case():
    """Three points. Unit features (1, 0), (0, 1), (0.6, 0.8): cosines [[1, 0, .6], [0, 1, .8], [.6, .8, 1]],
    overall mean 29/45, row means 24/45, 27/45, 36/45. Pointwise centring gives fd = cos − row mean + 29/45:
    fd00 = 10/9, fd11 = 47/45, fd22 = 38/45, fd01 = 1/9, fd10 = 2/45 (centring is per anchor row, so fd is no
    longer symmetric). Codes (1, 0), (-1, 0), (0, 1): cd = [[1, -1, 0], [-1, 1, 0], [0, 0, 1]]. With shift ½ and
    the zero clamp only the diagonal counts: −(fd − ½) = −11/18, −49/90, −31/90. Without the clamp cd01 = cd10
    = −1 add (fd01 − ½) = −7/18 and (fd10 − ½) = −41/90."""
    features = torch.tensor([[1.0, 0.0, 0.6], [0.0, 1.0, 0.8]]).view(1, 2, 1, 3)
    code = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]]).view(1, 2, 1, 3)
    clamped = correlation_term(features, features, code, code, shift=0.5).view(3, 3)
    expected = torch.diag(torch.tensor([-11 / 18, -49 / 90, -31 / 90]))
    torch.testing.assert_close(clamped, expected, atol=1e-6, rtol=0)
    unclamped = correlation_term(features, features, code, code, shift=0.5, zero_clamp=False).view(3, 3)
    assert unclamped[0, 1].item() == pytest.approx(-7 / 18, abs=1e-6)
    assert unclamped[1, 0].item() == pytest.approx(-41 / 90, abs=1e-6)

def test_random_partners_are_never_the_image_itself():
    generator = torch.Generator().manual_seed(0)
    for size in (2, 3, 16):
        for _ in range(50):
            partners = random_partners(size, generator)
            assert not (partners == torch.arange(size)).any() and partners.max() < size

# --- the head ----------------------------------------------------------------------------------------------

def test_head_forward_equals_a_transcription_of_stegos_module():
    """STEGO's DinoFeaturizer in eval mode: code = cluster1(f) + cluster2(f) on B×D×h×w features, where cluster1
    is a 1×1 conv and cluster2 a 1×1 conv, ReLU, 1×1 conv (all with biases)."""
    torch.manual_seed(0)
    head = SegmentationHead(feature_dim=24, code_dim=7).eval()
    tokens = torch.randn(2, 5, 6, 24)
    f = tokens.permute(0, 3, 1, 2)
    w = {name: value.detach() for name, value in head.state_dict().items()}
    linear = F.conv2d(f, w["cluster1.0.weight"], w["cluster1.0.bias"])
    hidden = F.relu(F.conv2d(f, w["cluster2.0.weight"], w["cluster2.0.bias"]))
    nonlinear = F.conv2d(hidden, w["cluster2.2.weight"], w["cluster2.2.bias"])
    torch.testing.assert_close(head(tokens), (linear + nonlinear).permute(0, 2, 3, 1), atol=1e-5, rtol=1e-5)
    assert sorted(w) == ["cluster1.0.bias", "cluster1.0.weight", "cluster2.0.bias", "cluster2.0.weight",
                         "cluster2.2.bias", "cluster2.2.weight"]

# --- nearest neighbours ------------------------------------------------------------------------------------

def test_nearest_images_equal_brute_force_cosine_ranking():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(40, 3, 3, 16)).astype(np.float32)
    descriptors = np.stack([global_descriptor(tokens) for tokens in maps])
    pooled = maps.reshape(40, -1, 16).mean(axis=1)
    np.testing.assert_allclose(descriptors, pooled / np.linalg.norm(pooled, axis=1, keepdims=True), atol=1e-6)
    found = nearest_images(descriptors, k=5)
    brute = np.argsort(-(descriptors @ descriptors.T), axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(found, brute)
    assert (found[:, 0] == np.arange(40)).all()
    with pytest.raises(PipelineError, match="k = 40 needs at least 41 images"):
        nearest_images(descriptors, k=40)

# --- released checkpoints ----------------------------------------------------------------------------------

BACKBONE = "dino_vits16"

def random_head_tensors(feature_dim: int, code_dim: int, clusters: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"cluster1.0.weight": (code_dim, feature_dim, 1, 1), "cluster1.0.bias": (code_dim,),
              "cluster2.0.weight": (feature_dim, feature_dim, 1, 1), "cluster2.0.bias": (feature_dim,),
              "cluster2.2.weight": (code_dim, feature_dim, 1, 1), "cluster2.2.bias": (code_dim,),
              "clusters": (clusters, code_dim)}
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}

def _fake_class(module: str, name: str) -> type:
    """A class importable as `module.name` while a checkpoint is written (what OmegaConf / Lightning pickle)."""
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
    cls = type(name, (), {"__module__": module})
    setattr(sys.modules[module], name, cls)
    return cls

def write_stego_checkpoint(path: Path, tensors: dict[str, torch.Tensor], payload: object = None) -> None:
    """A checkpoint in the layout of STEGO's released Lightning .ckpt files (state_dict keys, OmegaConf cfg,
    a ModelCheckpoint callback state keyed by its class), with a random DINO ViT-S/16 as `net.model`."""
    backbone = build_backbone(BACKBONE, random_init=True)[0]
    state = collections.OrderedDict({f"net.model.{key}": value for key, value in backbone.state_dict().items()})
    state.update({f"net.{key}": value for key, value in tensors.items() if key != "clusters"})
    state["cluster_probe.clusters"] = tensors["clusters"]
    state["train_cluster_probe.clusters"] = torch.randn(27, tensors["clusters"].shape[1])
    state["linear_probe.weight"] = torch.randn(27, tensors["clusters"].shape[1], 1, 1)
    state["linear_probe.bias"] = torch.zeros(27)
    with patch.dict(sys.modules):  # restores the real omegaconf that DVC's tests import, and drops the fakes
        for name in [name for name in sys.modules if name.split(".")[0] in ("omegaconf", "pytorch_lightning")]:
            del sys.modules[name]
        dict_config = _fake_class("omegaconf.dictconfig", "DictConfig")
        any_node = _fake_class("omegaconf.nodes", "AnyNode")
        callback = _fake_class("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
        cfg = dict_config()
        cfg.__dict__.update(_content={"model_type": any_node(), "dino_patch_size": any_node()}, _parent=None)
        checkpoint = {"epoch": 3, "global_step": 5000, "pytorch-lightning_version": "1.5.10", "state_dict": state,
                      "callbacks": {callback: {"monitor": "test/cluster/mIoU", "best_model_score": torch.tensor(0.2)}},
                      "optimizer_states": [{"state": {}, "param_groups": [{"lr": 5e-4}]}], "lr_schedulers": [],
                      "hparams_name": "kwargs", "hyper_parameters": {"n_classes": 27, "cfg": cfg}}
        if payload is not None:
            checkpoint["extra"] = payload
        torch.save(checkpoint, path)

def write_hp_checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """HP's ckpt.pth layout: net_model_state_dict (backbone, head, EMA head), cluster_model_state_dict."""
    backbone = build_backbone(BACKBONE, random_init=True)[0]
    net = collections.OrderedDict({f"model.{key}": value for key, value in backbone.state_dict().items()})
    net.update({key: value for key, value in tensors.items() if key != "clusters"})
    net.update({key.replace("cluster", "ema_model"): value + 1.0 for key, value in tensors.items() if key != "clusters"})
    torch.save({"epoch": 2, "iter": 100, "net_model_state_dict": net, "net_optimizer_state_dict": None,
                "linear_model_state_dict": collections.OrderedDict(weight=torch.zeros(27, 5, 1, 1), bias=torch.zeros(27)),
                "cluster_model_state_dict": collections.OrderedDict(clusters=tensors["clusters"]), "best": 1.5}, path)

class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))

MARKER = Path("/tmp/primaps-malicious-payload-ran")

@pytest.fixture(scope="module")
def random_vits16_features(tmp_path_factory, camvid) -> Path:
    out = tmp_path_factory.mktemp("heads") / "features.h5"
    run_extract(ExtractSettings(dataset="camvid", root=str(camvid), split="val", backbone=BACKBONE, out=out,
                                resolution=64, max_images=4, random_init=True), progress=False)
    return out

def test_stego_checkpoint_loads_without_running_pickled_code(tmp_path):
    tensors = random_head_tensors(384, 5, 27, seed=1)
    path = tmp_path / "cocostuff27_vit_small.ckpt"
    write_stego_checkpoint(path, tensors)
    with pytest.raises(Exception):
        torch.load(path, map_location="cpu", weights_only=True)
    head = read_stego_checkpoint(path)
    assert head.kind == "stego" and head.backbone == BACKBONE and head.code_dim == 5 and head.feature_dim == 384
    torch.testing.assert_close(head.clusters, tensors["clusters"])
    for key, value in head.head_state.items():
        torch.testing.assert_close(value, tensors[key])
    assert head.backbone_tensors_sha256 == tensors_fingerprint(build_backbone(BACKBONE, random_init=True)[0].state_dict())

def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    MARKER.unlink(missing_ok=True)
    path = tmp_path / "evil.ckpt"
    write_stego_checkpoint(path, random_head_tensors(384, 5, 27, seed=1), payload=_Payload())
    with pytest.raises(PipelineError) as error:
        read_stego_checkpoint(path)
    assert "refusing the global posix.system" in str(error.value) or "refusing the global os.system" in str(error.value)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert not MARKER.exists()

def test_hp_checkpoint_gives_the_trained_head_not_the_ema_copy(tmp_path):
    tensors = random_head_tensors(384, 6, 27, seed=2)
    write_hp_checkpoint(tmp_path / "ckpt.pth", tensors)
    head = read_hp_checkpoint(tmp_path / "ckpt.pth")
    assert head.kind == "hp" and head.backbone == BACKBONE and head.code_dim == 6
    for key, value in head.head_state.items():
        torch.testing.assert_close(value, tensors[key])
    torch.testing.assert_close(head.clusters, tensors["clusters"])

def test_checkpoints_with_wrong_keys_or_shapes_are_named(tmp_path):
    tensors = random_head_tensors(384, 5, 27, seed=3)
    tensors["cluster2.2.weight"] = torch.randn(5, 100, 1, 1)
    write_stego_checkpoint(tmp_path / "bad.ckpt", tensors)
    with pytest.raises(PipelineError, match=r"bad\.ckpt: STEGO head shapes do not fit together: cluster2\.2\.weight"):
        read_stego_checkpoint(tmp_path / "bad.ckpt")
    torch.save({"net_model_state_dict": {}, "cluster_model_state_dict": {}}, tmp_path / "empty.pth")
    with pytest.raises(PipelineError, match=r"empty\.pth: not a HP checkpoint: missing keys \['cluster1\.0\.weight'"):
        read_hp_checkpoint(tmp_path / "empty.pth")

def test_import_head_checks_the_backbone_of_the_features(tmp_path, random_vits16_features, camvid):
    tensors = random_head_tensors(384, 5, 27, seed=4)
    write_stego_checkpoint(tmp_path / "stego.ckpt", tensors)
    line = run_import_head(ImportHeadSettings(tmp_path / "stego.ckpt", "stego", random_vits16_features,
                                              tmp_path / "head.pt"))
    assert "stego head 384 → 5 dims, 27 clusters, backbone dino_vits16" in line
    record = load_checkpoint(tmp_path / "head.pt")
    assert record["kind"] == "head" and record["source"]["checkpoint"] == str(tmp_path / "stego.ckpt")

    other = tmp_path / "vitb16.h5"
    run_extract(ExtractSettings(dataset="camvid", root=str(camvid), split="val", backbone="dino_vitb16", out=other,
                                resolution=64, max_images=2, random_init=True), progress=False)
    with pytest.raises(PipelineError, match=r"features do not match the ones head .*backbone \(head: dino_vits16"):
        run_import_head(ImportHeadSettings(tmp_path / "stego.ckpt", "stego", other, tmp_path / "other.pt"))

    write_hp_checkpoint(tmp_path / "tampered.pth", tensors)
    tampered = torch.load(tmp_path / "tampered.pth", weights_only=True)
    tampered["net_model_state_dict"]["model.norm.weight"] += 0.01
    torch.save(tampered, tmp_path / "tampered.pth")
    with pytest.raises(PipelineError, match=r"backbone_tensors_sha256 \(head: "):
        run_import_head(ImportHeadSettings(tmp_path / "tampered.pth", "hp", random_vits16_features, tmp_path / "t.pt"))

# --- training a head here -----------------------------------------------------------------------------------

def test_resumed_head_training_equals_an_uninterrupted_one(camvid_features, tmp_path):
    whole = TrainHeadSettings(features=camvid_features, out=tmp_path / "whole.pt", clusters=5, code_dim=8,
                              epochs=3, batch_size=4, neighbours=3, feature_samples=5, neg_samples=2)
    summary = run_train_head(whole, progress=False)
    assert summary.epochs_run == 3 and np.isfinite(summary.last["loss"])
    resumed = replace(whole, out=tmp_path / "resumed.pt", neighbours_out=tmp_path / "whole.neighbours.npz")
    assert run_train_head(resumed, progress=False, stop_after_epochs=1).epochs_run == 1
    assert not resumed.out.exists() and resumed.out.with_name("resumed.pt.partial").exists()
    assert run_train_head(resumed, progress=False).epochs_run == 2
    expected, found = load_checkpoint(whole.out), load_checkpoint(resumed.out)
    for key, value in expected["state"].items():
        assert torch.equal(value, found["state"][key]), key
    assert torch.equal(expected["clusters"], found["clusters"])
    assert expected["history"] == found["history"]
    first = load_checkpoint(whole.out)["history"][0]
    assert {"loss", "self", "neighbour", "random", "probe"} <= set(first)
    with pytest.raises(PipelineError, match=r"made with different settings: .*code_dim \(file: 8, now: 9\)"):
        run_train_head(replace(whole, code_dim=9), progress=False)

def test_the_kmeans_probe_gives_every_cluster_part_of_the_split_and_online_keeps_stegos(camvid_features, tmp_path):
    """The default probe is spherical k-means of the finished head's code: each of the K centroids is the nearest
    one of some of the split's tokens. `probe=online` keeps the centroids STEGO's online probe trained."""
    online = TrainHeadSettings(features=camvid_features, out=tmp_path / "online.pt", clusters=11, code_dim=8,
                               epochs=2, batch_size=4, neighbours=3, feature_samples=5, neg_samples=2, probe="online")
    kmeans = replace(online, out=tmp_path / "kmeans.pt", neighbours_out=tmp_path / "online.neighbours.npz",
                     probe="kmeans")
    run_train_head(online, progress=False)
    run_train_head(kmeans, progress=False)
    online_head, kmeans_head = load_checkpoint(online.out), load_checkpoint(kmeans.out)
    assert torch.equal(online_head["clusters"], online_head["training"]["probe"]["clusters"])
    for key, value in online_head["state"].items():
        assert torch.equal(value, kmeans_head["state"][key]), key
    with FeatureFile(camvid_features) as features:
        tokens = torch.from_numpy(np.stack([features.features(int(i)) for i in features.valid_indices()])).float()
    with torch.no_grad():
        code = F.normalize(build_head(kmeans_head["state"])(tokens).reshape(-1, 8), dim=1)
    owners = (code @ F.normalize(kmeans_head["clusters"], dim=1).T).argmax(dim=1)
    assert len(owners.unique()) == 11
    with pytest.raises(PipelineError, match=r"probe 'best': choose one of kmeans, online"):
        replace(online, probe="best")

# --- PriMaPs-EM on a head's code ---------------------------------------------------------------------------

@pytest.mark.parametrize("cosine", [False, True], ids=["raw-logits", "cosine-logits"])
def test_em_on_code_features_reaches_95_percent_on_planted_data(cosine):
    """Planted scenes through a fixed head (a random rotation of the 16 channels plus a weak random nonlinear
    branch): the classes stay apart in code space, and EM fitted on the code from a confused cluster probe
    recovers them, with the paper's raw logits and with cosine ones starting at the probe's gain of 2."""
    torch.manual_seed(0)
    scenes = PlantedScenes(seed=3)
    head = SegmentationHead(feature_dim=16, code_dim=16).eval().requires_grad_(False)
    with torch.no_grad():
        projection = torch.linalg.qr(torch.randn(16, 16))[0]
        head.cluster1[0].weight.copy_(projection.view(16, 16, 1, 1))
        head.cluster2[2].weight.mul_(0.1)
    test_tokens, _, test_labels = scenes.batch(32)
    with torch.no_grad():
        class_means = torch.stack([head(torch.tensor(2.0 * scenes.directions[k] + scenes.offset,
                                                     dtype=torch.float32).view(1, 1, 1, -1)).view(-1)
                                   for k in range(K)])
    confused_probe = class_means + 0.8 * class_means.roll(-1, dims=0)
    model = PrimapsEM(confused_probe.numpy(), EMConfig(num_classes=K, logits="cosine" if cosine else "raw", initial_gain=2.0 if cosine else 1.0))

    def accuracy() -> float:
        evaluator = SegmentationEvaluator(K)
        prototypes = Prototypes(K, 16, cosine=cosine)
        prototypes.load_state_dict(model.momentum.state_dict())
        segmenter = Segmenter(prototypes, head)
        with torch.no_grad():
            evaluator.process(segmenter.pixel_classes(test_tokens, CROP).numpy(), test_labels)
        return evaluator.evaluate()["pixel_accuracy"]

    initial = accuracy()
    for _ in range(80):
        tokens, masks, _ = scenes.batch(8)
        noisy = tokens + 0.15 * torch.from_numpy(scenes.rng.normal(size=tokens.shape)).float()
        with torch.no_grad():
            clean_code, student_code = head(tokens), head(noisy)
        model.step(clean_code, student_code, masks)
    assert initial < 90.0
    assert accuracy() >= 95.0

def test_stego_plus_primaps_em_end_to_end_from_the_cache(camvid_features, camvid_masks, tmp_path):
    """head → fit --head (EM on the code from the cluster probe) → evaluate the probe and EM side by side."""
    from stages.evaluate import EvaluateSettings, run_evaluate
    from stages.fit import FitSettings, run_fit

    head = TrainHeadSettings(features=camvid_features, out=tmp_path / "head.pt", clusters=11, code_dim=8, epochs=2,
                             batch_size=4, neighbours=3, feature_samples=5, neg_samples=2)
    run_train_head(head, progress=False)
    fit = FitSettings(features=camvid_features, masks=camvid_masks, classes=11, out=tmp_path / "stego_em.pt",
                      baseline_out=tmp_path / "stego_probe.pt", head=head.out, epochs=2, overrides={"batch_size": 4})
    run_fit(fit, progress=False)
    probe, em = load_checkpoint(fit.baseline_out), load_checkpoint(fit.out)
    assert probe["kind"] == "cluster-probe" and em["kind"] == "primaps-em"
    torch.testing.assert_close(probe["momentum"]["direction"], load_checkpoint(head.out)["clusters"])
    torch.testing.assert_close(em["init"], probe["init"])
    assert em["head"]["head_type"] == "stego" and em["provenance"]["head"]["fingerprint"]
    assert em["momentum"]["direction"].shape == (11, 8)
    assert fit.recipe_name == "head" and replace(fit, head=None).recipe_name == "tuned", \
        "a fit on a head's code takes the head recipe unless one is named; on tokens the tuned one"
    assert em["recipe_name"] == "head" and em["em_config"] == asdict(fit.em_config())
    assert em["em_config"]["ema_every"] == RECIPES["head"].get("ema_every", EMConfig.ema_every), \
        "the model stores the configuration it used, the head recipe's"
    summary = run_evaluate(EvaluateSettings(model=fit.out, features=camvid_features, out=tmp_path / "eval",
                                            extra_models=(("stego", fit.baseline_out),)), progress=False)
    assert list(summary)[1:3] == ["primaps_em", "stego"]
    for row in ("primaps_em", "stego"):
        assert 0 < summary[row]["no_crf"]["pixel_accuracy"] <= 100
    assert em["logits"] == "raw" and not load_segmenter(em).prototypes.cosine, "the paper's raw logits by default"
    cosine = replace(fit, out=tmp_path / "stego_em_cosine.pt", epochs=1).overriding(logits="cosine")
    with FeatureFile(camvid_features) as features:
        tokens = torch.from_numpy(features.features(0)).float()[None]
    start = Segmenter(PrimapsEM(probe["init"].numpy(), cosine.em_config()).momentum, load_segmenter(probe).head)
    torch.testing.assert_close(start.pixel_logits(tokens, CROP), load_segmenter(probe).pixel_logits(tokens, CROP))
    run_fit(cosine, progress=False)
    assert load_checkpoint(cosine.out)["logits"] == "cosine" and load_segmenter(load_checkpoint(cosine.out)).prototypes.cosine
    with pytest.raises(PipelineError, match=r"--classes 5: the head's cluster probe has 11 clusters"):
        run_fit(replace(fit, classes=5, out=tmp_path / "k5.pt"), progress=False)
    from PIL import Image

    from stages.report import ReportSettings, run_report

    report = run_report(ReportSettings(features=camvid_features, masks=camvid_masks, model=fit.out,
                                       metrics=tmp_path / "eval", out=tmp_path / "report",
                                       extra_models=(("stego", fit.baseline_out),), sample=1), progress=False)
    assert report.images == 1
    strip = next((tmp_path / "report" / "gallery").glob("*.png"))
    with Image.open(strip) as picture:
        assert picture.width == 6 * 224, "crop | masks | pseudo label | PriMaPs-EM | STEGO | ground truth"
