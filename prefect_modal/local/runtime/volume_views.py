"""A sandbox's private view of a v1 Volume, merged into the volume when the sandbox ends.

On Modal a VolumeFS v1 volume (the version an unversioned volume gets,
``modal/volume.py:_validate_volume_version``) receives a sandbox's writes when
the sandbox terminates: "files are only synced back to the Volume when the
Sandbox terminates" (Modal's guide, Sandbox files). Until then the Volume API
and other sandboxes see the volume as it was. v2 volumes are live, and the
local server binds them directly.

So a v1 mount gets a copy of the volume taken at create (`make_view`), bound
where the volume would be; when the sandbox ends (exited, terminated, timed
out) what it changed there is applied to the volume (`merge_view`): files it
added or changed are written, files it removed are removed, last writer wins
per file, as with Modal's commits. The copy costs time and disk in proportion
to the volume, so a large volume read by many sandboxes is better made v2.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

#: relative path -> (mode, size, mtime_ns) of each entry of the view at create
Manifest = dict[str, tuple[int, int, int]]


@dataclass
class VolumeView:
    """One v1 mount: the volume's directory, the sandbox's copy, the copy's start state."""

    volume: Path
    view: Path
    manifest: Manifest = field(default_factory=dict)


def _scan(root: Path) -> Manifest:
    found: Manifest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            found[rel] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


def make_view(volume: Path, view: Path) -> VolumeView:
    """Copy ``volume`` to ``view`` (symlinks as links) and note what the copy holds."""
    volume.mkdir(parents=True, exist_ok=True)
    view.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(volume, view, symlinks=True)
    return VolumeView(volume=volume, view=view, manifest=_scan(view))


def _inside(volume_real: str, target: Path) -> bool:
    """Whether ``target``'s parent resolves inside the volume (a symlink a sandbox put
    there must not make the server write outside it)."""
    parent = os.path.realpath(target.parent)
    return parent == volume_real or parent.startswith(volume_real + os.sep)


def merge_view(v: VolumeView) -> None:
    """Apply what the sandbox changed in its view to the volume (blocking file I/O)."""
    if not v.view.is_dir():
        return
    now = _scan(v.view)
    volume_real = os.path.realpath(v.volume)
    for rel in sorted(set(v.manifest) - set(now), key=len, reverse=True):  # removed
        target = v.volume / rel
        if not _inside(volume_real, target) or not os.path.lexists(target):
            continue
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target, ignore_errors=True)
        else:
            os.unlink(target)
    for rel in sorted(now, key=len):  # added or changed, parents first
        mode, size, mtime = now[rel]
        before = v.manifest.get(rel)
        if before == (mode, size, mtime) and not stat.S_ISDIR(mode):
            continue
        src, target = v.view / rel, v.volume / rel
        if not _inside(volume_real, target):
            continue
        if stat.S_ISDIR(mode):
            if os.path.islink(target) or (os.path.lexists(target) and not target.is_dir()):
                os.unlink(target)
            target.mkdir(exist_ok=True)
            continue
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        elif os.path.lexists(target):
            os.unlink(target)
        shutil.copy2(src, target, follow_symlinks=False)
