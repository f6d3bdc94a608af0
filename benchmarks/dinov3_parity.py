"""DINOv3 parity: the project's DINOv3 ViTs against Meta's own model code, from the same random weights.

For every architecture, the reference model (built by the dinov3 checkout's hub function, `pretrained=False`)
gets random weights, which are saved under the official key names and loaded into the project's model
through `build_backbone(name, weights=file)`, the strict loader users go through. The script then checks
that both state dicts have exactly the same keys, that the registry's constants (width, depth, heads,
storage tokens, LayerNorm eps, RoPE base, coordinate normalisation, RoPE periods, FFN width) are the
reference's, and compares the last block's normalised patch tokens at each input size.

The reference's own init leaves LayerScale at 1e-5, which would hide almost every block from the comparison;
every parameter is therefore drawn again: matrices N(0, 1/fan_in), LayerScale and LayerNorm weights
1 + N(0, 0.2²), biases (the masked key bias included) N(0, 0.1²), CLS / storage / mask tokens N(0, 1).
Float32 on the CPU, batch 1, inputs N(0, 1) per pixel in the ImageNet normalisation (the SAT-493M model's
reference input is the same pixels in its own normalisation).

    OMP_NUM_THREADS=1 python benchmarks/dinov3_parity.py --reference /path/to/dinov3 [--archs dinov3_vits16,...]

Without a checkout at --reference it prints "skipped" and exits with status 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from pipeline.backbones import build_backbone, get_spec  # noqa: E402
from pipeline.backbones.dinov3 import rope_periods  # noqa: E402
from pipeline.data import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402

# Registry name → (the reference hub function, its `weights` argument naming the pretraining data set).
REFERENCE_BUILDERS = {
    "dinov3_vits16": ("dinov3_vits16", "LVD1689M"),
    "dinov3_vits16plus": ("dinov3_vits16plus", "LVD1689M"),
    "dinov3_vitb16": ("dinov3_vitb16", "LVD1689M"),
    "dinov3_vitl16": ("dinov3_vitl16", "LVD1689M"),
    "dinov3_vitl16_sat493m": ("dinov3_vitl16", "SAT493M"),
    "dinov3_vith16plus": ("dinov3_vith16plus", "LVD1689M"),
}
DEFAULT_SIZES = ((224, 224), (160, 256))
TOLERANCE = 1e-4
SEED = 0


def reference_available(reference: Path) -> bool:
    """Whether `reference` looks like a dinov3 checkout (holds dinov3/hub/backbones.py)."""
    return (reference / "dinov3" / "hub" / "backbones.py").is_file()


def reference_model(reference: Path, name: str) -> torch.nn.Module:
    """The reference's untrained model of registry entry `name`, float32 on the CPU, in eval mode."""
    if str(reference) not in sys.path:
        sys.path.insert(0, str(reference))
    from dinov3.hub import backbones as hub

    function, weights = REFERENCE_BUILDERS[name]
    return getattr(hub, function)(pretrained=False, weights=hub.Weights[weights]).eval()


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Draw every parameter again (see the module docstring); buffers (RoPE periods, bias mask) stay."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if key.endswith(("token", "tokens")):
                parameter.copy_(noise)
            elif parameter.ndim >= 2:
                parameter.copy_(noise / parameter[0].numel() ** 0.5)
            elif key.endswith("gamma") or ("norm" in key and key.endswith("weight")):
                parameter.copy_(1 + 0.2 * noise)
            else:
                parameter.copy_(0.1 * noise)


def constant_mismatches(name: str, model: torch.nn.Module) -> list[str]:
    """Where registry entry `name` disagrees with the reference model's constants (the widths of every tensor
    are checked by the strict load itself)."""
    spec = get_spec(name)
    options = spec.dinov3
    pairs = {
        "patch_size": (spec.patch_size, model.patch_size),
        "embed_dim": (spec.embed_dim, model.embed_dim),
        "depth": (spec.depth, model.n_blocks),
        "num_heads": (spec.num_heads, model.num_heads),
        "n_storage_tokens": (options.n_storage_tokens, model.n_storage_tokens),
        "final_norm_eps": (options.layer_norm_eps, model.norm.eps),
        "block_norm_eps": (options.layer_norm_eps, model.blocks[0].norm1.eps),
        "ffn_layer": (options.ffn_layer, "mlp" if hasattr(model.blocks[0].mlp, "fc1") else "swiglu"),
        "rope_base": (options.rope_base, model.rope_embed.base),
        "rope_normalize_coords": ("separate", model.rope_embed.normalize_coords),
        "rope_dtype": (torch.float32, model.rope_embed.dtype),
        "local_cls_norm": (options.local_cls_norm, model.local_cls_norm is not None),
    }
    wrong = [f"{key}: ours {ours!r} != reference {theirs!r}" for key, (ours, theirs) in pairs.items() if ours != theirs]
    if not torch.equal(rope_periods(spec.embed_dim // spec.num_heads, options.rope_base), model.rope_embed.periods):
        wrong.append("rope periods differ")
    return wrong


def images(sizes: tuple[tuple[int, int], ...], seed: int) -> list[torch.Tensor]:
    """One N(0, 1) ImageNet-normalised 1×3×H×W input per size."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, height, width, generator=generator) for height, width in sizes]


def reference_input(name: str, image: torch.Tensor) -> torch.Tensor:
    """`image` (ImageNet-normalised) in the normalisation the reference model of `name` expects."""
    options = get_spec(name).dinov3
    if options.input_mean is None:
        return image

    def channels(values: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(values).view(1, 3, 1, 1)

    pixels = image * channels(IMAGENET_STD) + channels(IMAGENET_MEAN)
    return (pixels - channels(options.input_mean)) / channels(options.input_std)


def compare(reference: Path, name: str, sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES,
            seed: int = SEED) -> dict:
    """Parity of one architecture: key sets, constants and max |diff| of the patch tokens at each size."""
    started = time.perf_counter()
    inputs = images(sizes, seed)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / get_spec(name).official_filename
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = reference_model(reference, name)
        constants = constant_mismatches(name, model)
        randomise(model, seed)
        state = model.state_dict()
        reference_keys = set(state)
        torch.save(state, path)
        del state
        with torch.inference_mode():
            expected = []
            for image in inputs:
                patches = model.forward_features(reference_input(name, image))["x_norm_patchtokens"]
                patch = get_spec(name).patch_size
                expected.append(patches.reshape(1, image.shape[2] // patch, image.shape[3] // patch, -1))
        del model
        gc.collect()
        try:
            ours, _ = build_backbone(name, path)
        except PipelineError as error:
            return {"backbone": name, "keys_equal": False, "constant_mismatches": constants, "sizes": [],
                    "load_error": str(error), "ok": False, "seconds": round(time.perf_counter() - started, 1)}
    keys_equal = set(ours.state_dict()) == reference_keys
    results = []
    with torch.inference_mode():
        for image, reference_tokens in zip(inputs, expected):
            tokens = ours(image)
            results.append({
                "size": f"{image.shape[2]}x{image.shape[3]}",
                "shape_equal": tokens.shape == reference_tokens.shape,
                "max_abs_diff": float((tokens - reference_tokens).abs().max()),
                "max_abs_reference": float(reference_tokens.abs().max()),
            })
    del ours
    gc.collect()
    ok = keys_equal and not constants and all(r["shape_equal"] and r["max_abs_diff"] <= TOLERANCE for r in results)
    return {"backbone": name, "keys_equal": keys_equal, "constant_mismatches": constants, "sizes": results,
            "ok": ok, "seconds": round(time.perf_counter() - started, 1)}


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(side) for side in size.split("x")) for size in text.split(","))


def main(argv: list[str] | None = None) -> int:
    """Run the comparison for each requested architecture and print one table row per size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="a facebookresearch/dinov3 checkout")
    parser.add_argument("--archs", default=",".join(REFERENCE_BUILDERS),
                        help=f"comma-separated registry names (default: all of {', '.join(REFERENCE_BUILDERS)})")
    parser.add_argument("--sizes", type=_sizes, default=DEFAULT_SIZES, help="HxW,HxW (default 224x224,160x256)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if not reference_available(args.reference):
        print(f"skipped: no dinov3 checkout at {args.reference} (dinov3/hub/backbones.py not found)")
        return 0
    names = [name.strip() for name in args.archs.split(",") if name.strip()]
    unknown = [name for name in names if name not in REFERENCE_BUILDERS]
    if unknown:
        parser.error(f"unknown --archs {unknown}: choose from {', '.join(REFERENCE_BUILDERS)}")
    torch.set_grad_enabled(False)
    print("| backbone | input | keys equal | constants | max abs diff | max abs token | ok |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for name in names:
        result = compare(args.reference, name, args.sizes)
        results.append(result)
        constants = "equal" if not result["constant_mismatches"] else "; ".join(result["constant_mismatches"])
        if "load_error" in result:
            print(f"| {name} | - | NO | {constants} | - | - | NO: {result['load_error']} |", flush=True)
        for row in result["sizes"]:
            ok = result["ok"] and row["max_abs_diff"] <= TOLERANCE
            print(f"| {name} | {row['size']} | {'yes' if result['keys_equal'] else 'NO'} | {constants} | "
                  f"{row['max_abs_diff']:.2e} | {row['max_abs_reference']:.2f} | {'yes' if ok else 'NO'} |",
                  flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(result["ok"] for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
