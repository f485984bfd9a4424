"""The /etc a sandbox sees: an allow list of this machine's, staged as a copy.

With a deny list (the host's /etc minus ``/etc/shadow``...), root in a sandbox
read every root-only file the list missed (issue 22). `stage_etc` copies what
`ETC_ALLOWED` names, and of it only what others may read, into the server's
state directory when it starts; `isolation.ImageView` binds that copy at
``/etc`` (the image's layers add their own /etc files over it).
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import shutil
import stat
from pathlib import Path

from .layers import copy_tree

#: The host's /etc a sandbox sees: an allow list (issue 22: a deny list let root
#: in a sandbox read every root-only file it missed). Top-level names (shell
#: patterns) or paths below /etc, each with why a Debian userland needs it. Of
#: these only what others may read is shown (`stage_etc`): a root-only file
#: inside an allowed directory (``apt/auth.conf.d``) stays hidden. The image's
#: own layers add their /etc files (a package's configuration directory) over it.
ETC_ALLOWED: dict[str, str] = {
    "passwd": "names of users (id, ls -l, Python's pwd and ~ expansion, adduser)",
    "group": "names of groups (id, ls -l, Python's grp, adduser)",
    "hosts": "name resolution of localhost and the machine's names (glibc)",
    "resolv.conf": "DNS servers: pip, apt, requests resolve names",
    "nsswitch.conf": "where glibc looks up users, groups and hosts",
    "host.conf": "glibc's resolver options",
    "gai.conf": "glibc's address order for getaddrinfo",
    "services": "port names (getservbyname: Python's socket, urllib)",
    "protocols": "protocol names (getprotobyname)",
    "networks": "network names (glibc)",
    "rpc": "RPC program names (glibc)",
    "ethertypes": "ethernet type names (iproute2)",
    "ld.so.cache": "the dynamic loader finds shared libraries",
    "ld.so.conf": "the loader's library directories (ldconfig in builds)",
    "ld.so.conf.d": "the loader's library directories (ldconfig in builds)",
    "ssl/certs": "the CA store: Python's ssl (/usr/lib/ssl/certs links here), curl, "
    "uv's trust bundle in builds (trust.uv_trust_env: /etc/ssl/certs/ca-certificates.crt)",
    "ssl/openssl.cnf": "OpenSSL's configuration (/usr/lib/ssl/openssl.cnf links here)",
    "ca-certificates": "local CAs update-ca-certificates adds to the store (builds)",
    "ca-certificates.conf": "which CAs update-ca-certificates puts in the store (builds)",
    "alternatives": "/usr/bin links (awk, editor, java...) lead through here",
    "os-release": "what the distribution is (platform.freedesktop_os_release, installers)",
    "debian_version": "the Debian release (installers)",
    "lsb-release": "the distribution (lsb_release, installers)",
    "localtime": "the time zone (date, Python's time.localtime)",
    "timezone": "the time zone's name",
    "locale.alias": "glibc's locale names",
    "mime.types": "file types by extension (Python's mimetypes)",
    "magic": "libmagic's local rules (file)",
    "magic.mime": "libmagic's local rules (file)",
    "mtab": "the mounts (df, mount; a link to /proc/self/mounts)",
    "shells": "valid login shells (adduser, chsh in builds)",
    "profile": "login shells' set-up (sh -l, bash -l)",
    "profile.d": "login shells' set-up (sh -l, bash -l)",
    "bash.bashrc": "interactive bash's set-up (pty sandboxes)",
    "inputrc": "readline's key bindings (pty sandboxes)",
    "terminfo": "terminal descriptions (pty sandboxes)",
    "skel": "a new user's home files (adduser in builds)",
    "login.defs": "uid ranges and password rules (useradd, adduser in builds)",
    "adduser.conf": "adduser's settings (maintainer scripts that add users)",
    "deluser.conf": "deluser's settings (maintainer scripts)",
    "dpkg": "dpkg's settings (apt_install's dpkg in the build sandbox)",
    "apt": "apt's sources and settings (apt-get in run_commands)",
    "debconf.conf": "debconf's settings (maintainer scripts ask it their questions)",
    "ucf.conf": "ucf's settings (maintainer scripts that manage configuration files)",
    "perl": "Perl's site configuration, first on its @INC (debconf is Perl)",
    "python3": "Debian's Python's sitecustomize",
    "python3.*": "Debian's Python's sitecustomize",
    "uv": "uv's system configuration (/etc/uv/uv.toml): a build's indexes, as uv here has them",
    "fonts": "fontconfig's configuration (matplotlib, browsers)",
}
#: Where the host's /etc is read from (a test points it at a tree of its own).
ETC_SOURCE = "/etc"
#: Top-level directories of the host that an /etc link may lead into and stay a
#: link in the view (the sandbox has them too); a link elsewhere (``resolv.conf ->
#: /run/systemd/...``) is shown as a copy of the file it leads to.
_LINKS_KEPT_INTO = ("/usr", "/proc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def _world_readable(st: os.stat_result) -> bool:
    """Others may read it (and enter it, for a directory): what any user of this
    machine may read anyway; a root-only file is never shown."""
    need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else 0)
    return st.st_mode & need == need


def allowed(rel: str) -> bool:
    """Whether ``rel`` (a path below /etc) is `ETC_ALLOWED`, lies inside an allowed
    entry, or is a directory on the way to one (``ssl`` for ``ssl/certs``)."""
    parts = rel.split("/")
    for pattern in ETC_ALLOWED:
        pat = pattern.split("/")
        if all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pat, strict=False)):
            return True
    return False


def stage_etc(source: str | Path, dest: Path) -> None:
    """``dest``: the /etc sandboxes see, made from ``source`` (this machine's /etc):
    the `ETC_ALLOWED` entries others may read, with their modes and links.

    A copy made when the server starts (not a bind of the host's /etc, which would
    show all of it): a change to an allowed host file later (a new DNS server in
    ``resolv.conf``) reaches sandboxes of the next server. Links are kept as links
    (``ssl/certs/*.pem -> /usr/share/ca-certificates/...``), but an allowed
    top-level link leading out of the sandbox's tree (``resolv.conf ->
    /run/systemd/...``) is shown as the file it leads to."""
    source = os.path.abspath(source)
    tmp = dest.with_name(dest.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    os.chmod(tmp, 0o755)
    for pattern in ETC_ALLOWED:
        parent, _, name = pattern.rpartition("/")
        src_parent = os.path.join(source, parent) if parent else source
        try:
            names = sorted(fnmatch.filter(os.listdir(src_parent), name))
        except OSError:
            continue
        for found in names:
            _stage_entry(source, f"{parent}/{found}" if parent else found, tmp)
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def _stage_entry(source: str, rel: str, dest: Path) -> None:
    src = os.path.join(source, rel)
    target = dest / rel
    # the directories on the way (ssl/ for ssl/certs), readable ones only
    here = source
    for part in rel.split("/")[:-1]:
        here = os.path.join(here, part)
        st = os.lstat(here)
        if not stat.S_ISDIR(st.st_mode) or not _world_readable(st):
            return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(src)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode):
        link = os.readlink(src)
        # where the link leads in the sandbox, where it is /etc/<rel>
        leads = posixpath.normpath(posixpath.join("/etc", posixpath.dirname(rel), link))
        if _shown_in_sandbox(leads):
            os.symlink(link, target)
            return
        try:  # a link out of what the sandbox sees: what it leads to, if others may read it
            real = os.path.realpath(src)
            real_st = os.stat(real)
        except OSError:
            return  # dangling
        if stat.S_ISREG(real_st.st_mode) and _world_readable(real_st):
            shutil.copyfile(real, target)
            os.chmod(target, stat.S_IMODE(real_st.st_mode))
        elif stat.S_ISDIR(real_st.st_mode) and _world_readable(real_st):
            _copy_readable_dir(real, target)
    elif stat.S_ISREG(st.st_mode) and _world_readable(st):
        shutil.copy2(src, target, follow_symlinks=False)
    elif stat.S_ISDIR(st.st_mode) and _world_readable(st):
        _copy_readable_dir(src, target)


def _shown_in_sandbox(path: str) -> bool:
    """Whether a sandbox sees ``path`` (a link's target): in its userland, its own
    /proc, or an allowed part of its /etc (Fedora's ``ssl/certs -> /etc/pki/...``
    is not, so the view holds what such a link leads to)."""
    if _under(path, ("/etc",)):
        return path != "/etc" and allowed(path[len("/etc/") :])
    return _under(path, _LINKS_KEPT_INTO)


def _copy_readable_dir(src: str, target: Path) -> None:
    """``src`` copied to ``target``, links as links, without what others may not read."""
    skip = [
        os.path.relpath(os.path.join(d, n), src)
        for d, dirnames, filenames in os.walk(src)
        for n in [*dirnames, *filenames]
        if not _readable_or_link(os.path.join(d, n))
    ]
    copy_tree(src, target, skip)


def _readable_or_link(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISLNK(st.st_mode) or _world_readable(st)


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


__all__ = ["ETC_ALLOWED", "ETC_SOURCE", "allowed", "stage_etc"]
