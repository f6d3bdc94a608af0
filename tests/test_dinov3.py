"""DINOv3 backbones: registry constants, RoPE per axis, storage tokens, masked key bias, strict official loading,
extract + propose end to end (random weights), and parity with Meta's code when a checkout is given."""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.backbones import BACKBONES, DINOv3ViT, build_backbone, get_spec
from pipeline.backbones.dinov3 import POSITION_RULE, DINOv3Options, rope_periods, rope_rotate, rope_sin_cos
from pipeline.data import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import PipelineError
from pipeline.store.features import FeatureFile
from stages.extract import ExtractSettings, run_extract
from stages.propose import ProposeSettings, run_propose
from tests.conftest import REPOSITORY

DINOV3 = {name: spec for name, spec in BACKBONES.items() if spec.family == "dinov3"}
SMALL = "dinov3_vits16"
# Parameter and state-dict key counts of the reference's own models (dinov3/hub/backbones.py,
# pretrained=False), counted from the checkout; the README rounds them to 21M, 29M, 86M, 300M and 840M.
REFERENCE_SIZES = {
    "dinov3_vits16": (21_601_152, 188),
    "dinov3_vits16plus": (28_697_472, 212),
    "dinov3_vitb16": (85_669_632, 188),
    "dinov3_vitl16": (303_154_176, 368),
    "dinov3_vitl16_sat493m": (303_156_224, 370),
    "dinov3_vith16plus": (840_633_600, 552),
}


@pytest.fixture(scope="module")
def small():
    return build_backbone(SMALL, random_init=True)[0]


def meta_model(name: str) -> DINOv3ViT:
    """The architecture of registry entry `name` on the meta device: shapes only, nothing allocated."""
    spec = get_spec(name)
    with torch.device("meta"):
        return DINOv3ViT(name=name, patch_size=spec.patch_size, embed_dim=spec.embed_dim, depth=spec.depth,
                         num_heads=spec.num_heads, options=spec.dinov3)


# --- registry -------------------------------------------------------------------------------------

def test_registry_entries_are_consistent():
    assert set(DINOV3) == set(REFERENCE_SIZES)
    for name, spec in DINOV3.items():
        assert spec.patch_size == 16 and spec.default_resolution // spec.patch_size == 20
        assert spec.embed_dim % spec.num_heads == 0 and (spec.embed_dim // spec.num_heads) % 4 == 0
        assert spec.position_interpolation == POSITION_RULE and spec.train_resolution is None
        assert spec.dinov3.n_storage_tokens == 4 and spec.dinov3.ffn_layer == ("swiglu" if "plus" in name else "mlp")
        weights = "sat493m" if name.endswith("_sat493m") else "lvd1689m"
        arch = name.removesuffix("_sat493m")
        assert re.fullmatch(rf"{arch}_pretrain_{weights}-[0-9a-f]{{8}}\.pth", spec.official_filename), name
        satellite = weights == "sat493m"
        assert spec.dinov3.local_cls_norm == satellite and (spec.dinov3.input_mean is not None) == satellite


@pytest.mark.parametrize("name", list(REFERENCE_SIZES))
def test_sizes_match_the_reference(name):
    model = meta_model(name)
    params, keys = REFERENCE_SIZES[name]
    assert sum(parameter.numel() for parameter in model.parameters()) == params
    assert len(model.state_dict()) == keys and len(model.blocks) == get_spec(name).depth


def test_satellite_file_has_the_local_cls_norm_on_top():
    extra = set(meta_model("dinov3_vitl16_sat493m").state_dict()) - set(meta_model("dinov3_vitl16").state_dict())
    assert extra == {"local_cls_norm.weight", "local_cls_norm.bias"}


def test_random_init_builds_the_official_layout_reproducibly(small):
    assert isinstance(small, DINOv3ViT) and not small.training and small.family == "dinov3"
    assert not any(parameter.requires_grad for parameter in small.parameters())
    state = small.state_dict()
    assert state["storage_tokens"].shape == (1, 4, 384) and state["mask_token"].shape == (1, 384)
    assert "pos_embed" not in state and "blocks.0.mlp.fc1.weight" in state
    assert torch.equal(state["rope_embed.periods"], rope_periods(64, 100.0))
    mask = state["blocks.0.attn.qkv.bias_mask"]
    assert torch.equal(mask, torch.cat([torch.ones(384), torch.zeros(384), torch.ones(384)]))
    again, weights_id = build_backbone(SMALL, random_init=True)
    assert weights_id == "random"
    assert all(torch.equal(value, again.state_dict()[key]) for key, value in state.items())


# --- RoPE, storage tokens, key bias ---------------------------------------------------------------

def test_non_square_and_640_inputs_give_their_grids(small):
    with torch.inference_mode():
        tokens = small(torch.randn(1, 3, 48, 80))
        assert tokens.shape == (1, 3, 5, 384) and tokens.dtype == torch.float32 and torch.isfinite(tokens).all()
        assert small(torch.randn(1, 3, 640, 640)).shape == (1, 40, 40, 384)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        small(torch.randn(1, 3, 48, 72))


def test_rope_coordinates_are_normalised_per_axis():
    """A 3×5 grid: rows sit at ±2/3 and 0, columns at ±0.8, ±0.4 and 0, each axis spanning its own [-1, 1]."""
    periods = rope_periods(16, 100.0)
    sin, cos = rope_sin_cos(periods, 3, 5)
    rows, cols = (2 * np.arange(3) + 1) / 3 - 1, (2 * np.arange(5) + 1) / 5 - 1
    y, x = np.repeat(rows, 5), np.tile(cols, 3)
    angles = 2 * math.pi * np.concatenate([y[:, None] / periods.numpy(), x[:, None] / periods.numpy()], axis=1)
    angles = np.concatenate([angles, angles], axis=1)
    np.testing.assert_allclose(sin.numpy(), np.sin(angles), atol=1e-6)
    np.testing.assert_allclose(cos.numpy(), np.cos(angles), atol=1e-6)
    # Transposing the grid swaps which channels carry which axis: 5×3 is not 3×5 with rows and columns renamed.
    sin_t, _ = rope_sin_cos(periods, 5, 3)
    assert not torch.allclose(sin_t.reshape(5, 3, 16).transpose(0, 1).reshape(15, 16), sin)


def test_rope_scores_depend_on_relative_positions_only():
    """Query and key vectors rotated to two positions score the same as rotated to the same pair shifted."""
    sin, cos = rope_sin_cos(rope_periods(64, 100.0), 3, 5)
    q, k = torch.randn(2, 64, dtype=torch.float64)
    sin, cos = sin.double(), cos.double()

    def score(query_at: int, key_at: int) -> float:
        return float(rope_rotate(q, sin[query_at], cos[query_at]) @ rope_rotate(k, sin[key_at], cos[key_at]))

    # (row 0, col 0) → (1, 1) and (1, 2) → (2, 3): the same step on both axes (angles are float32).
    assert score(0, 6) == pytest.approx(score(7, 13), abs=1e-5)
    assert score(0, 6) != pytest.approx(score(0, 7), abs=1e-3)


def test_storage_tokens_take_part_but_are_not_output(small):
    image = torch.randn(1, 3, 48, 80)
    changed = build_backbone(SMALL, random_init=True)[0]
    with torch.no_grad():
        changed.storage_tokens.add_(torch.randn(changed.storage_tokens.shape))
        assert small(image).shape[1:3] == (3, 5)
        assert not torch.allclose(changed(image), small(image), atol=1e-3)


def test_key_third_of_the_qkv_bias_is_masked(small):
    image = torch.randn(1, 3, 32, 48)
    model = build_backbone(SMALL, random_init=True)[0]
    with torch.no_grad():
        reference = small(image)
        for block in model.blocks:
            block.attn.qkv.bias[384:768] += 5.0
        assert torch.equal(model(image), reference)
        for block in model.blocks:
            block.attn.qkv.bias[:384] += 5.0
        assert not torch.allclose(model(image), reference, atol=1e-3)


def test_forward_under_autocast_returns_float32(small):
    image = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        reference = small(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = small(image)
    assert tokens.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(tokens, reference, dim=-1).min() > 0.95


def test_satellite_weights_see_their_own_normalisation():
    """The SAT-493M model converts ImageNet-normalised input to the satellite mean and std before patching."""
    options = DINOv3Options(ffn_layer="mlp", ffn_ratio=4.0, n_storage_tokens=4, layer_norm_eps=1e-5,
                            rope_base=100.0)
    satellite = get_spec("dinov3_vitl16_sat493m").dinov3
    torch.manual_seed(0)
    plain = DINOv3ViT(name="tiny", patch_size=16, embed_dim=32, depth=1, num_heads=2, options=options).eval()
    converting = DINOv3ViT(name="tiny", patch_size=16, embed_dim=32, depth=1, num_heads=2,
                           options=replace(options, input_mean=satellite.input_mean, input_std=satellite.input_std))
    converting.load_state_dict(plain.state_dict())
    image = torch.randn(1, 3, 32, 32)
    pixels = image * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    in_satellite_terms = (pixels - torch.tensor(satellite.input_mean).view(1, 3, 1, 1)) / torch.tensor(
        satellite.input_std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(converting.eval()(image), plain(in_satellite_terms), atol=1e-5, rtol=1e-5)


# --- official checkpoints -------------------------------------------------------------------------

def test_official_layout_round_trips(small, tmp_path):
    path = tmp_path / get_spec(SMALL).official_filename
    torch.save(small.state_dict(), path)
    loaded, weights_id = build_backbone(SMALL, path)
    assert weights_id == hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(loaded.state_dict()) == set(small.state_dict())
    image = torch.randn(1, 3, 48, 80)
    with torch.inference_mode():
        assert torch.equal(loaded(image), small(image))


def test_dinov2_checkpoint_is_refused_in_one_line(tmp_path):
    dinov2, _ = build_backbone("dinov2_vits14", random_init=True)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(dinov2.state_dict(), path)
    with pytest.raises(PipelineError) as error:
        build_backbone(SMALL, path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: not a {SMALL} checkpoint: missing keys ['storage_tokens', "
                              "'rope_embed.periods', 'blocks.0.attn.qkv.bias_mask'")
    assert "unexpected keys ['pos_embed']" in message
    assert "patch_embed.proj.weight (384, 3, 14, 14) != (384, 3, 16, 16)" in message


def test_checkpoint_with_a_missing_key_is_refused(small, tmp_path):
    state = small.state_dict()
    del state["blocks.11.attn.qkv.bias_mask"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(PipelineError) as error:
        build_backbone(SMALL, path)
    assert str(error.value) == (f"{path}: not a {SMALL} checkpoint: "
                                "missing keys ['blocks.11.attn.qkv.bias_mask'], unexpected keys []")


def test_official_backbone_names_its_weights_file():
    with pytest.raises(PipelineError, match=re.escape(get_spec(SMALL).official_filename)):
        build_backbone(SMALL)


# --- end to end -----------------------------------------------------------------------------------

def test_extract_and_propose_run_on_dinov3_tokens(tmp_path):
    features_path = tmp_path / "sample.h5"
    run_extract(ExtractSettings(dataset="sample", split="train", backbone=SMALL, out=features_path, batch_size=2,
                                max_images=2, random_init=True), progress=False)
    with FeatureFile(features_path) as features:
        provenance = features.provenance
        assert len(features) == 2 and features.grid == 20 and features.dim == 384
        assert np.isfinite(features.features(0)).all()
    assert provenance["backbone_family"] == "dinov3" and provenance["weights_sha256"] == "random"
    assert provenance["position_interpolation"] == POSITION_RULE and provenance["resolution"] == 320
    summary = run_propose(ProposeSettings(features=features_path, out=tmp_path / "masks", crf=None, workers=1),
                          progress=False)
    assert (summary.params.psi, summary.params.center) == (0.8, "dataset_mean")
    assert not summary.failed and summary.masks_per_image >= 1


# --- parity with Meta's code ----------------------------------------------------------------------

def test_parity_with_the_reference_checkout():
    """Runs only with $PRIMAPS_DINOV3_REFERENCE naming a facebookresearch/dinov3 checkout."""
    reference = os.environ.get("PRIMAPS_DINOV3_REFERENCE")
    if not reference or not (Path(reference) / "dinov3" / "hub" / "backbones.py").is_file():
        pytest.skip("set PRIMAPS_DINOV3_REFERENCE to a facebookresearch/dinov3 checkout to compare with it")
    sys.path.insert(0, str(REPOSITORY / "benchmarks"))
    import dinov3_parity

    result = dinov3_parity.compare(Path(reference), SMALL)
    assert result["keys_equal"] and not result["constant_mismatches"]
    assert [row["size"] for row in result["sizes"]] == ["224x224", "160x256"]
    assert all(row["max_abs_diff"] <= dinov3_parity.TOLERANCE for row in result["sizes"]), result
