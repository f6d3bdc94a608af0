"""The working-memory bound: a stage estimates what its options make it allocate and refuses, in one line,
before it starts, a run that would not fit the device it runs on.

Options that scale memory (a batch size, a sampling grid, a code width, a resolution, a number of classes)
each have a range, but what exhausts memory is their product, so a range per option cannot bound it. Each
stage's estimate (`*_bytes` next to the code it describes) counts the largest tensors that live at once,
with their autograd copies; it is an upper-side approximation, not a measurement. The bound is a share of
the device's memory, so the same options pass on a large machine and are refused on a small one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.errors import PipelineError

MEMORY_SHARE = 0.5
"""Share of the device's memory one stage may plan to use; the rest stays for the system, the caches and
the estimate's error."""

FLOAT_BYTES = 4
"""Bytes of a float32, the type every stage computes in."""

_GIB = 1 << 30


CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
"""Where a container's memory limit is read (cgroup v2, then v1): inside one, the machine's memory overstates it."""


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of `device`: the GPU's own memory, or for the CPU the machine's physical memory or the
    container's limit, whichever is smaller."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in CGROUP_LIMITS:
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            memory = min(memory, int(text))
    return memory


def require_within_budget(command: str, needed: int, device: torch.device, options: str, advice: str) -> None:
    """Refuse a run of `command` whose estimated working memory `needed` exceeds the share of `device`'s
    memory; the line names the `options` that set it and the `advice` on which to lower."""
    budget = int(device_memory_bytes(device) * MEMORY_SHARE)
    if needed > budget:
        raise PipelineError(f"{command}: {options} need about {needed / _GIB:,.1f} GiB of working memory on "
                            f"{device.type}, above the {budget / _GIB:,.1f} GiB allowed ({MEMORY_SHARE:.0%} of "
                            f"its memory); {advice}")
