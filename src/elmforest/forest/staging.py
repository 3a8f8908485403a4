"""How an expert's checkpoint enters the forest: copied (regular files only) beside its place and
renamed in, so a failed or killed copy leaves nothing half-written, and the size and checksum of each
weight file recorded as it lands.

Apart from forest/manifest.py because it touches files, not the manifest: the manifest decides under
its lock when a staged copy is renamed into place.
"""

from __future__ import annotations

from pathlib import Path

from elmforest.forest.trust import copy_regular_files
from elmforest.utils.io import file_digest, remove_path, staged_dir, temp_sibling

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def _stage_checkpoint(src: Path, dst: Path, link: bool = False) -> Path:
    """Copy a checkpoint's regular files next to `dst` (unique per host and process), ready to be
    renamed into place; nothing is left behind if the copy fails."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dst, "stage")
    try:
        tmp.mkdir()
        copy_regular_files(src, tmp, link=link)
    except BaseException:
        remove_path(tmp)
        raise
    return tmp


def _copy_checkpoint(src: Path, dst: Path, link: bool = False) -> None:
    """Copy an HF checkpoint dir (hard links only for files the forest owns); lands atomically by rename."""
    with staged_dir(dst) as tmp:
        copy_regular_files(src, tmp, link=link)


def weight_digests(model_dir: Path) -> dict:
    """Size and sha256 of each weight file, recorded when an expert lands, verified by `forest fsck`."""
    return {f.name: file_digest(f) for f in sorted(model_dir.iterdir()) if f.name.endswith(WEIGHT_SUFFIXES)}
