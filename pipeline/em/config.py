"""The PriMaPs-EM recipe: every hyper-parameter of a fit declared once, and the named recipes that set them.

A field of EMConfig with a `meaning` is a recipe key: its default is the paper's value, its metadata holds what it
means and which values it allows. The CLI's `--set KEY=VALUE`, params.yaml's `fit.set`, the range checks and
`primaps-pipeline recipes` are derived from these fields. A named recipe (RECIPES) is a set of values that were
chosen together; `fit --recipe NAME --set KEY=VALUE` starts from it and changes single keys. A model file stores the
configuration it resolved to, so every reader takes the values from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from pipeline.errors import PipelineError
from pipeline.ranges import MAX_MASK_WEIGHTING, Range

VOTE_RULES = ("majority", "transport", "restore", "anchored")
"""How the E-step turns θ_M's per-pixel classes into pseudo labels: `majority`, the paper's most frequent class per
mask; `transport`, one class per mask chosen so that every class keeps θ_M's share of the masked pixels;
`restore`, the majority vote, after which a class the vote left below θ_M's count keeps its own pixels where it
covers most of a mask; `anchored`, θ_M's classes first rebalanced to the shares the initial prototypes give the
batch (anchored_bias), then `restore` (pipeline/em/vote.py)."""

LOGITS = ("raw", "cosine")
"""Prototype scores on raw features (the paper) or on L2-normalised ones."""

_SHARE = Range(0, 1)


def _key(default: Any, meaning: str, allowed: Range | tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"meaning": meaning, "allowed": allowed})


@dataclass(frozen=True)
class EMConfig:
    """One fit's hyper-parameters. Defaults are the paper's (docs/method.md); `num_classes`, `seed` and
    `initial_gain` (where every prototype gain starts: a head's cluster probe scores with gain 2) come from the fit,
    not from a recipe."""

    num_classes: int
    learning_rate: float = _key(5e-3, "Adam learning rate of the running prototypes θ_R", Range(0, low_open=True))
    batch_size: int = _key(32, "images per EM step", Range(1))
    ema_every: int = _key(10, "steps between the EMA updates of the momentum prototypes θ_M", Range(1))
    ema_max_decay: float = _key(0.98, "cap of θ_M's EMA decay (the k-th update uses min(k/(k+1), cap))", _SHARE)
    gamma: float = _key(2.0, "focal exponent γ of the M-step class weights (1 − p̄_c)^γ", Range(0))
    vote: str = _key("majority", "E-step rule: " + " | ".join(VOTE_RULES), VOTE_RULES)
    min_share: float = _key(0.0, "E-step: leave a mask unlabelled when its winning class covers less of it", _SHARE)
    vote_balance: float = _key(0.0, "E-step: divide a class's votes in a mask by its batch share^τ", _SHARE)
    keep_share: float = _key(1.0, "E-step: a class covering at least this share of a mask keeps its pixels",
                             Range(0, 1, low_open=True))
    teacher_fallback: bool = _key(False, "E-step: label what the vote leaves unlabelled with θ_M's own class")
    mask_weighting: float = _key(0.0, "M-step pixel weight |mask|^-w (1: every mask alike; 0: every pixel alike)",
                                 Range(0, MAX_MASK_WEIGHTING))
    logits: str = _key("raw", "prototype scores on raw or L2-normalised features", LOGITS)
    augmented_student: bool = _key(True, "M-step on a cached augmented view (false: on the clean view)")
    init_samples: int = _key(200_000, "tokens sampled for the Baseline's PCA + spherical k-means", Range(1))
    kmeans_iterations: int = _key(100, "spherical k-means iterations of the Baseline", Range(1))
    initial_gain: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for key in recipe_keys():
            _check(key, getattr(self, key))

    @property
    def cosine(self) -> bool:
        return self.logits == "cosine"

    def recipe_values(self) -> dict[str, Any]:
        """Every recipe key's value."""
        return {key: getattr(self, key) for key in recipe_keys()}


def recipe_keys() -> tuple[str, ...]:
    """The names of the recipe keys, in declaration order."""
    return tuple(item.name for item in fields(EMConfig) if "meaning" in item.metadata)


def key_field(key: str) -> Any:
    """The dataclass field of a recipe key; a one-line error naming the valid keys otherwise."""
    for item in fields(EMConfig):
        if item.name == key and "meaning" in item.metadata:
            return item
    raise PipelineError(f"--set {key}: not a recipe key; choose one of {', '.join(recipe_keys())}")


TUNED_TOKENS = {"learning_rate": 2e-3, "ema_every": 1, "ema_max_decay": 0.9, "vote_balance": 0.5, "keep_share": 0.3,
                "teacher_fallback": True, "mask_weighting": 1.0}
HEAD_CODE = {"learning_rate": 2e-3, "teacher_fallback": True}
ANCHORED_TOKENS = {**TUNED_TOKENS, "vote": "anchored", "vote_balance": 0.0, "keep_share": 1.0}

RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "tuned": TUNED_TOKENS,
    "head": HEAD_CODE,
    "anchored": ANCHORED_TOKENS,
}
"""Named recipes, each the keys it changes from the paper's values. `paper`: the authors' values. `tuned`: the
recipe chosen for raw tokens by the training-fold protocol; `head`: the one chosen for a head's code
(docs/results/em-recipe.md, heads.md). `anchored`: `tuned` with the anchored vote instead of the balanced one,
which keeps every cluster alive at a cost in pixel accuracy (docs/results/em-vote-rules.md)."""

DEFAULT_RECIPES = {"tokens": "tuned", "head": "head"}
"""The recipe a fit uses when none is named: on raw tokens, and on a head's code."""


def resolve(name: str, overrides: Mapping[str, Any], *, num_classes: int, seed: int = 0,
            initial_gain: float = 1.0) -> EMConfig:
    """The configuration of recipe `name` with single keys overridden; every value checked."""
    if name not in RECIPES:
        raise PipelineError(f"--recipe {name}: unknown recipe; choose one of {', '.join(RECIPES)}")
    for key in overrides:
        key_field(key)
    return EMConfig(num_classes=num_classes, seed=seed, initial_gain=initial_gain, **{**RECIPES[name], **overrides})


def parse_assignment(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` → (KEY, VALUE typed as the recipe key's field), or a one-line error."""
    key, separator, value = text.partition("=")
    if not separator:
        raise PipelineError(f"--set {text}: expected KEY=VALUE")
    kind = key_field(key.strip()).type
    value = value.strip()
    try:
        if kind == "bool":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            typed: Any = value.lower() in ("true", "1", "yes")
        else:
            typed = {"int": int, "float": float, "str": str}[kind](value)
    except ValueError:
        raise PipelineError(f"--set {text}: {key.strip()} takes a {kind}") from None
    _check(key.strip(), typed)
    return key.strip(), typed


def _check(key: str, value: Any) -> None:
    allowed = key_field(key).metadata["allowed"]
    kind = key_field(key).type
    wrong_type = (kind == "bool") != isinstance(value, bool) or (kind in ("int", "float") and isinstance(value, str))
    if wrong_type:
        raise PipelineError(f"--set {key}={value}: {key} takes a {kind}")
    if isinstance(allowed, Range) and value not in allowed:
        verb = "be" if allowed.high is None else "lie"
        raise PipelineError(f"--set {key}={value}: must {verb} {allowed}")
    if isinstance(allowed, tuple) and value not in allowed:
        raise PipelineError(f"--set {key}={value}: must be one of {', '.join(allowed)}")


def describe() -> str:
    """Every recipe key with its meaning, allowed values and each named recipe's value (`primaps-pipeline recipes`)."""
    names = list(RECIPES)
    rows = [["key", *names, "allowed", "meaning"]]
    for key in recipe_keys():
        item = key_field(key)
        allowed = item.metadata["allowed"]
        rows.append([key, *(str(RECIPES[name].get(key, item.default)) for name in names),
                     ("true | false" if item.type == "bool" else " | ".join(allowed) if isinstance(allowed, tuple)
                      else str(allowed) if allowed else ""), item.metadata["meaning"]])
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows)
