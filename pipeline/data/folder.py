"""Any directory of images, searched recursively: the unlabelled "bring your own photos" dataset."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.base import IMAGE_SUFFIXES, FileDataset, ImageFile, require_root
from pipeline.errors import PipelineError


class ImageFolder(FileDataset):
    """Every image file below ``root`` (any depth), sorted by relative path, without labels.

    Hidden files and folders (names starting with '.') are skipped. There are no splits: ``split``
    is accepted for a uniform interface and ignored. An image's name is its path relative to
    ``root`` without the extension, so ``a/b.jpg`` is ``a/b``; two files that differ only in
    extension would share a name and are rejected. Images are turned as their EXIF orientation says.
    """

    apply_orientation = True

    def __init__(
        self, root: str | Path | None, split: str | None = None, *, max_images: int | None = None
    ) -> None:
        base = require_root(root, "folder")
        files: dict[str, ImageFile] = {}
        for path in sorted(base.rglob("*")):
            relative = path.relative_to(base)
            if path.suffix.lower() not in IMAGE_SUFFIXES or _is_hidden(relative) or not path.is_file():
                continue
            name = relative.with_suffix("").as_posix()
            if name in files:
                raise PipelineError(
                    f"{path}: image name '{name}' is taken by {files[name].image.name}; rename one of them"
                )
            files[name] = ImageFile(name, path)
        if not files:
            suffixes = " ".join(IMAGE_SUFFIXES)
            raise PipelineError(f"{base}: no images found (looked recursively for {suffixes})")
        super().__init__(list(files.values()), class_names=None, max_images=max_images)


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)
