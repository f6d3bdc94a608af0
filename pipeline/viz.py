"""Pictures for people: mask overlays, palettes, the confusion matrix, the HTML gallery."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402
from markdown_it import MarkdownIt  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from pipeline.store.atomic import atomic_path  # noqa: E402

IGNORE_COLOUR = (0, 0, 0)


def palette(count: int) -> np.ndarray:
    """`count` distinct RGB colours (uint8), stable across calls: tab20 then a golden-ratio hue walk."""
    colours = [tuple(int(255 * c) for c in plt.get_cmap("tab20")(i)[:3]) for i in range(min(count, 20))]
    for i in range(20, count):
        hue = (i * 0.618033988749895) % 1.0
        colours.append(tuple(int(255 * c) for c in matplotlib.colors.hsv_to_rgb((hue, 0.75, 0.9))))
    return np.array(colours, dtype=np.uint8).reshape(-1, 3)


def colourise(ids: np.ndarray, colours: np.ndarray, ignore: int = 255) -> np.ndarray:
    """Id map → RGB (uint8); `ignore` pixels are black."""
    rgb = np.zeros(ids.shape + (3,), np.uint8)
    valid = ids != ignore
    rgb[valid] = colours[ids[valid] % len(colours)]
    return rgb


def boundaries(ids: np.ndarray) -> np.ndarray:
    """Boolean map of pixels whose right or lower neighbour carries another id."""
    edge = np.zeros(ids.shape, bool)
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    return edge


def overlay(crop: np.ndarray, ids: np.ndarray, colours: np.ndarray, alpha: float = 0.55, ignore: int = 255,
            outline: bool = False) -> np.ndarray:
    """The crop with the id map blended on top; ignored pixels keep the photo; optional white region outlines."""
    blended = crop.astype(np.float32)
    valid = ids != ignore
    blended[valid] = (1 - alpha) * blended[valid] + alpha * colourise(ids, colours, ignore)[valid]
    if outline:
        blended[boundaries(ids)] = 255
    return blended.round().astype(np.uint8)


def save_cluster_share_figure(path: str | Path, shares: dict[str, Sequence[float]]) -> None:
    """Share of pixels per cluster for each model, as grouped bars (a collapsed fit shows at once)."""
    figure, axes = plt.subplots(figsize=(2.5 + 0.4 * max(len(v) for v in shares.values()), 3))
    width = 0.8 / len(shares)
    for offset, (name, values) in enumerate(shares.items()):
        axes.bar(np.arange(len(values)) + offset * width, 100 * np.asarray(values), width, label=name)
    axes.set_xlabel("cluster")
    axes.set_ylabel("% of pixels")
    axes.legend()
    figure.tight_layout()
    _save_figure(figure, path)


def save_history_figure(path: str | Path, history: Sequence[dict[str, Any]]) -> None:
    """A fit's loss, pseudo-labelled share and each cluster's share of the pseudo labels per epoch, side by side
    (an image plot DVC shows offline); a cluster whose share falls towards 0 is starving."""
    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, share_axes, class_axes) = plt.subplots(1, 3, figsize=(12, 3))
    loss_axes.plot(epochs, [row["loss"] for row in history], marker="o")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("M-step loss")
    share_axes.plot(epochs, [100 * row["labelled_fraction"] for row in history], marker="o", color="tab:green")
    share_axes.set_xlabel("epoch")
    share_axes.set_ylabel("% pixels pseudo-labelled")
    rows = [row for row in history if "class_shares" in row]
    if rows:
        shares = 100 * np.array([row["class_shares"] for row in rows])
        class_axes.plot([row["epoch"] for row in rows], np.maximum(shares, 1e-3))
        class_axes.set_yscale("log")
    class_axes.set_xlabel("epoch")
    class_axes.set_ylabel("% of pseudo labels, per cluster")
    for axes in (loss_axes, share_axes, class_axes):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    _save_figure(figure, path)


def _save_figure(figure: plt.Figure, path: str | Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)


def save_confusion_figure(path: str | Path, confusion: np.ndarray, class_names: Sequence[str]) -> None:
    """Row-normalised matched confusion matrix (true class × predicted class) as a PNG."""
    totals = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, totals, out=np.zeros(confusion.shape, float), where=totals > 0)
    size = 2.5 + 0.45 * len(class_names)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(normalised, cmap="viridis", vmin=0, vmax=1)
    axes.set_xticks(range(len(class_names)), class_names, rotation=90)
    axes.set_yticks(range(len(class_names)), class_names)
    axes.set_xlabel("predicted (after Hungarian matching)")
    axes.set_ylabel("ground truth")
    for (row, column), value in np.ndenumerate(normalised):
        if value >= 0.01:
            axes.text(column, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                      color="black" if value > 0.5 else "white")
    figure.tight_layout()
    _save_figure(figure, path)


TITLE_HEIGHT = 20
TITLE_BACKGROUND = (32, 32, 32)
TITLE_COLOUR = (240, 240, 240)


def panel_strip(panels: Sequence[tuple[str, np.ndarray]], title_height: int = TITLE_HEIGHT) -> np.ndarray:
    """Equal-height RGB panels side by side, each under its title bar: one inspection picture per image.

    The strip is exactly as wide as the panels together, so a strip of n crops is n × crop pixels wide.
    """
    heights = {image.shape[0] for _, image in panels}
    if len(heights) != 1:
        raise ValueError(f"panels must share one height, got {sorted(heights)}")
    height = heights.pop()
    width = sum(image.shape[1] for _, image in panels)
    strip = Image.new("RGB", (width, height + title_height), TITLE_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    left = 0
    for title, image in panels:
        strip.paste(Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)), (left, title_height))
        draw.text((left + 4, title_height // 2), title, fill=TITLE_COLOUR, anchor="lm")
        left += image.shape[1]
    return np.asarray(strip)


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Atomically write a uint8 H×W (grey / id map) or H×W×3 (RGB) array as a PNG."""
    with atomic_path(path) as temporary:
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(temporary, format="PNG")


def colour_legend_html(names: Sequence[str], colours: np.ndarray) -> str:
    """An inline HTML legend: one swatch per name, in id order."""
    items = "".join(f'<span class="swatch" style="background:rgb{tuple(int(c) for c in colour)}"></span>'
                    f"{escape(name)} " for name, colour in zip(names, colours))
    return f'<p class="legend">{items}</p>'


def definition_table_html(caption: str, rows: dict[str, object]) -> str:
    """A two-column HTML table (key, value) under a heading, values escaped."""
    body = "".join(f"<tr><th>{escape(key)}</th><td>{escape(str(value))}</td></tr>" for key, value in rows.items())
    return f"<h2>{escape(caption)}</h2><table class=\"facts\">{body}</table>"


def markdown_table_html(markdown: str) -> str:
    """A markdown document (such as evaluate's per-class table) as HTML, raw HTML in it escaped."""
    return MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)


_PAGE_STYLE = """body{font-family:sans-serif;margin:1.5em;background:#fafafa;color:#222}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}
figure{margin:1em 0}figcaption{font-size:90%;color:#444}img{max-width:100%;image-rendering:pixelated}
.swatch{display:inline-block;width:1em;height:1em;margin:0 .25em 0 .75em;vertical-align:middle;border:1px solid #888}
.note{background:#fff6d5;padding:.5em;border-left:4px solid #e0b000}"""


def gallery_html(title: str, sections: Sequence[str], figures: Sequence[tuple[str, str]]) -> str:
    """A static, self-contained HTML page: `sections` (trusted HTML fragments) and then one figure per
    (relative image path, caption); paths are URL-quoted, captions escaped."""
    body = "\n".join(sections)
    items = "\n".join(f'<figure><a href="{quote(src)}"><img src="{quote(src)}" alt="{escape(caption)}"></a>'
                      f"<figcaption>{escape(caption)}</figcaption></figure>" for src, caption in figures)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{_PAGE_STYLE}</style></head>\n<body><h1>{escape(title)}</h1>\n{body}\n{items}\n</body></html>\n")
