"""What a ``run_commands`` layer is made of (`builder.Builder._run`).

The build sandbox's root, as the command leaves it, is the layer: a whole
root (it began as a copy of the earlier layers' files outside the image's
read-only directories). Its ``/usr`` and ``/etc`` were writable overlays,
whose upper directories (`take_uppers`) hold only their changes; so the
earlier layers' files there stay shown below it, one tree each
(`view_parts`), and an ``apt_install``'s ``/usr/bin/jq`` is not lost.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from ..runtime.layers import overlay_workdir

#: The view directories a build sandbox of ``run_commands`` may change, as on
#: Modal (a writable overlay each: the host's files are never changed); their
#: changes are the layer's, shown over the host's in later sandboxes.
WRITABLE_VIEW = ("/usr", "/etc")


def take_uppers(fs: Path, uppers: dict[str, Path]) -> None:
    """Each writable overlay's upper directory (its changes, whiteouts included)
    takes the place of its empty mount point in the root ``fs``."""
    for path, upper in uppers.items():
        target = fs / path.strip("/")
        if target.is_dir() and not target.is_symlink():
            os.rmdir(target)
        os.rename(upper, target)
        shutil.rmtree(overlay_workdir(upper), ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(fs.parent / "upper")


def view_parts(layers: list[Path], dest: Path) -> list[str]:
    """The earlier layers' files under `WRITABLE_VIEW` (``usr/``, ``etc/``), one
    tree each under ``dest``, in order: what later sandboxes show below a
    ``run_commands`` layer that is a whole root. Hard links (these trees are only
    ever overlay lower layers, which nothing writes), whiteouts kept as
    whiteouts and opaque directories as opaque, so overlayfs reads them as the
    layers they come from."""
    kept: list[str] = []
    for i, layer in enumerate(layers):
        parts = [
            d.strip("/")
            for d in WRITABLE_VIEW
            if (layer / d.strip("/")).is_dir() and not (layer / d.strip("/")).is_symlink()
        ]
        if not parts:
            continue  # its files are in the new root already
        tree = dest / f"{i:03d}"
        for part in parts:
            link_tree(layer / part, tree / part)
        kept.append(str(tree))
    return kept


#: overlayfs's mark of a directory that hides the lower layers' one: ``trusted.``
#: as root, ``user.`` for an overlay mounted in a user namespace (``userxattr``)
_OPAQUE = ("trusted.overlay.opaque", "user.overlay.opaque")


def link_tree(src: Path, dst: Path) -> None:
    """A copy of ``src`` whose files are hard links (a cached layer is never changed in
    place: installs replace files, they do not rewrite them), keeping overlayfs's marks:
    whiteouts and opaque directories."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        target = dst / rel if rel != "." else dst
        target.mkdir(parents=True, exist_ok=True)
        shutil.copystat(dirpath, target)
        for mark in _OPAQUE:
            with contextlib.suppress(OSError):
                os.setxattr(target, mark, os.getxattr(dirpath, mark))
        linked = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in [*filenames, *linked]:
            s = os.path.join(dirpath, name)
            st = os.lstat(s)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(s), target / name)
            elif stat.S_ISREG(st.st_mode) or (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
                try:
                    os.link(s, target / name, follow_symlinks=False)
                except OSError:
                    if stat.S_ISREG(st.st_mode):
                        shutil.copy2(s, target / name)
                    else:  # a whiteout: made anew (not root: it cannot be, as in `layers`)
                        with contextlib.suppress(PermissionError):
                            os.mknod(target / name, stat.S_IFCHR | 0o600, os.makedev(0, 0))


__all__ = ["WRITABLE_VIEW", "link_tree", "take_uppers", "view_parts"]
