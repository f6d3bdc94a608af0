"""The allowed range of every numeric setting, in one table: the Settings dataclasses check it, and the CLI
turns it into click types, so a typed option, a params.yaml key and a library call meet the same rule and a
value outside it is refused with the option's name and the range."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import click

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval; None leaves that side unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def __contains__(self, value: float) -> bool:
        if value != value:  # NaN is in no range
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def __str__(self) -> str:
        if self.high is None:
            return f"{'above' if self.low_open else 'at least'} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}]"

    def click_type(self, integer: bool = False) -> click.ParamType:
        if integer:
            return click.IntRange(self.low, self.high)
        return click.FloatRange(self.low, self.high, min_open=self.low_open)


MAX_MASK_WEIGHTING = 2.0
"""Largest |mask|^-w exponent accepted: beyond it a large mask's weight underflows float32 towards 0."""

_COUNT = Range(1)
_SEED = Range(0)
_SHARE = Range(0, 1)

RANGES: dict[str, dict[str, Range]] = {
    "extract": {"resolution": _COUNT, "views": Range(0), "batch_size": _COUNT, "seed": _SEED, "max_images": _COUNT,
                "ignore_value": Range(0, 255), "threads": _COUNT},
    "propose": {"psi": Range(0, 1, low_open=True), "stop_fraction": Range(0, 1, low_open=True),
                "crf_iterations": Range(0), "workers": _COUNT, "timeout": Range(0, low_open=True)},
    "fit": {"classes": Range(2), "epochs": _COUNT, "seed": _SEED, "threads": _COUNT},
    "head": {"clusters": Range(2), "code_dim": _COUNT, "epochs": _COUNT, "batch_size": Range(2),
             "learning_rate": Range(0, low_open=True), "probe_learning_rate": Range(0, low_open=True),
             "neighbours": _COUNT, "feature_samples": _COUNT, "neg_samples": Range(0), "seed": _SEED,
             "pos_intra_weight": Range(0), "pos_inter_weight": Range(0), "neg_inter_weight": Range(0),
             "threads": _COUNT},
    "evaluate": {"workers": _COUNT},
    "predict": {"threads": _COUNT},
    "inspect": {"sample": _COUNT, "seed": _SEED},
    "report": {"sample": _COUNT, "seed": _SEED},
}


def allowed(command: str, option: str, integer: bool = False) -> click.ParamType:
    """The click type of `command`'s `--option`: its value type restricted to the allowed range."""
    return RANGES[command][option].click_type(integer)


def check_ranges(command: str, values: Mapping[str, Any]) -> None:
    """Refuse the first value of `command`'s settings outside its range (None means "not set")."""
    for option, interval in RANGES[command].items():
        value = values.get(option)
        if value is not None and (isinstance(value, bool) or value not in interval):
            verb = "be" if interval.high is None else "lie"
            raise PipelineError(f"--{option.replace('_', '-')} {value}: must {verb} {interval}")
