"""``Image.apt_install`` for the local Modal server: Debian packages installed into a layer.

A local image's base is this machine's Debian userland (its ``/usr`` and
``/etc``, read-only in every sandbox), so what an ``apt_install`` layer must
hold is what Debian would add to *this* system: the named packages (always,
even when this machine has them: the image says it wants them) and those of
their dependencies that this machine does not have, resolved by apt against
its dpkg status. apt-get does the resolving and fetching, with everything it
writes kept under ``cache_dir`` (its own package lists, archives and caches;
``APT::Sandbox::User=root`` so it can write there), so the host's apt state is
never touched and nothing is installed on the host.

The fetched ``.deb`` files are then installed by dpkg itself, as apt-get
would in Modal's image build, in a build sandbox (the runtime's container,
`builder.Builder._apt`): a copy of the host's dpkg and debconf state in its
root (`seed_dpkg_state`), ``/usr`` and ``/etc`` writable overlays over the
layers so far and the host's, whose upper directories become the layer
(`finish_layer`: files, the alternatives' links, whiteouts for what an
install removed). So maintainer scripts (``preinst``, ``postinst
configure``: ``update-alternatives``, ``ucf``, ``phpenmod``...) and triggers
run there, never on this machine: ``apt_install("php-cli")`` gives a
``/usr/bin/php``. A package that cannot be unpacked fails the build; one
whose maintainer script fails is a warning naming it (`check_dpkg`). The
layer keeps ``/var/lib/dpkg/alternatives`` and what the scripts wrote under
``/var``, not dpkg's database.

A server without a build sandbox (not isolated) only unpacks each package
with ``dpkg-deb -x`` into the layer (`unpack_packages`), laid out as the
sandbox's root (``dest/usr/bin/jq``); on a merged-``/usr`` host what a
package ships under ``/bin`` or ``/lib`` goes to ``/usr/bin`` or
``/usr/lib``, where the sandbox's ``/bin -> usr/bin`` leads. Its maintainer
scripts are not run: a package whose script does more than ``ldconfig`` or
triggers gets a *warning* naming the package and the commands it would have
run (`_script_effects`).

What cannot work this way (documented in docs/local-server.md, said in the build log):

* **Files under /etc**: the sandbox's ``/etc`` is this machine's allow-listed
  part (`runtime.etc_view.ETC_ALLOWED`), read-only;
  the layer's ``/etc`` files are shown over it (a read-only overlay, see
  `runtime.layers.overlays`), so a package's configuration files are there,
  but a program that writes its own ``/etc`` files at run time cannot. Host
  files that are masked in sandboxes (``/etc/shadow``...) stay masked, in the
  build sandbox too: a maintainer script that adds a user fails there (a
  warning naming the package).
* Packages this machine's sources do not have, version pins they cannot
  satisfy, and removals (a package that conflicts with one of this machine's
  cannot take its place: the base is read-only; dpkg refuses to unpack it)
  fail the build with apt's or dpkg's words, not worked around.

Package lists are refreshed (``apt-get update`` into the private lists) when
missing, older than `LISTS_MAX_AGE_S`, older than the host's sources, or
when a package or file is not found with lists older than
`LISTS_RETRY_AGE_S`; a mirror that cannot be reached with lists at hand is a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..runtime import layers

#: Package lists older than this are refreshed before a build (a day, as the
#: mirror's security updates come).
LISTS_MAX_AGE_S = 24 * 3600
#: A package or file not found with lists older than this refreshes them once
#: (the mirror moved on); younger lists make it an error at once.
LISTS_RETRY_AGE_S = 10 * 60
#: apt-get runs at most this long (a large package set on a slow mirror).
APT_TIMEOUT_S = 30 * 60

#: Debian Policy 5.6.1: lower-case letters, digits, '+', '-', '.'; two characters
#: at least; starting with a letter or digit. A version pin may follow '='.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_VERSION_RE = re.compile(r"[0-9][A-Za-z0-9.+~:-]*")
_RELEASE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~-]*")
NAME_RULE = (
    "Debian package names are lower-case letters, digits, '+', '-' and '.', at least two "
    "characters, starting with a letter or digit, optionally with '=<version>' or "
    "'/<release>' (e.g. 'jq', 'jq=1.6-2.1' or 'jq/bookworm')"
)

#: Top-level directories a merged-/usr system has as symlinks into /usr.
_USR_ALIASES = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
#: Commands a maintainer script may run without needing to be run here: shell
#: structure and tests, and what the loader or dpkg's triggers do anyway.
_HARMLESS = {
    "ldconfig",
    "dpkg-trigger",
    "dpkg-maintscript-helper",
    "set",
    "exit",
    "return",
    "shift",
    "true",
    "false",
    ":",
    "[",
    "[[",
    "test",
    "echo",
    "printf",
    "which",
    "command",
    "type",
    "local",
    "export",
    "unset",
    ".",
    "read",
    "umask",
    "cd",
    "continue",
    "break",
    "trap",
    "readlink",
    "realpath",
    "dirname",
    "basename",
    "grep",
    "dpkg-query",
}
_SHELL_WORDS = {"if", "then", "else", "elif", "fi", "case", "esac", "in", "for", "do", "done"}
_SHELL_WORDS |= {"while", "until", "{", "}", "!", "(", ")"}
_CASE_LABEL = re.compile(r"^\s*[^\s()]+(\s*\|\s*[^\s()]+)*\s*\)")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_COMMAND_NAME = re.compile(r"[A-Za-z_][\w.+-]*")
_FUNCTION = re.compile(r"^\s*(?:function\s+)?([A-Za-z_][\w-]*)\s*\(\)", re.M)
_HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)")
_INST = re.compile(r"^Inst (\S+) (?:\[[^\]]*\] )?\((\S+) [^\[]*\[([^\]]+)\]\)")
_REMV = re.compile(r"^Remv (\S+)")


class AptError(Exception):
    """A package cannot be put into the image's layer; the message says which,
    why (apt's own words where it has them) and what to do."""


class _ListsMayBeStale(AptError):
    """Not found with package lists that were not refreshed by this call: worth one retry."""


@dataclass(frozen=True)
class _Deb:
    name: str
    version: str
    arch: str

    @property
    def filename(self) -> str:
        # apt's archive file name: the version's ':' (an epoch) is quoted
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def _validate_names(packages: Sequence[str]) -> list[str]:
    """The packages as apt-get arguments; AptError for a value that is not a
    Debian package name (checked before anything runs: a value such as
    ``-o...`` must never reach apt-get as an option)."""
    if isinstance(packages, str):
        packages = [packages]
    names: list[str] = []
    for value in packages:
        if not isinstance(value, str):
            raise AptError(f"apt_install: {value!r} is not a string: {NAME_RULE}")
        name, sep, version = value.partition("=")
        name, slash, release = name.partition("/")
        if (
            not _NAME_RE.fullmatch(name)
            or (sep and not _VERSION_RE.fullmatch(version))
            or (slash and not _RELEASE_RE.fullmatch(release))
            or (sep and slash)
        ):
            raise AptError(f"apt_install: {value!r} is not a Debian package name: {NAME_RULE}")
        names.append(value)
    return list(dict.fromkeys(names))


def fetch_packages(
    packages: Sequence[str],
    *,
    cache_dir: Path,
    log: Callable[[str], None],
) -> list[tuple[str, Path]]:
    """Resolve ``packages`` against this machine's and fetch them and the
    dependencies this machine lacks into ``cache_dir`` (apt's private lists and
    archives: a second call for the same packages fetches nothing). Returns
    (package name, ``.deb``) in apt's plan order; empty for no packages."""
    names = _validate_names(packages)
    if not names:
        log("apt: no packages to install")
        return []
    if any(ch in str(cache_dir) for ch in '"\n;{}'):
        raise AptError(
            f"apt_install: the apt cache directory {str(cache_dir)!r} has a character apt's "
            "configuration cannot hold ('\"', ';', '{', '}', a newline): use another directory"
        )
    apt = _PrivateApt(Path(cache_dir), log)
    with apt.locked():
        fresh = False
        if apt.lists_stale():
            apt.update()
            fresh = True
        try:
            plan, debs = apt.resolve_and_fetch(names)
        except _ListsMayBeStale as exc:
            if fresh or not apt.lists_older_than(LISTS_RETRY_AGE_S):
                raise AptError(str(exc)) from None
            log("apt: not found with the package lists at hand; refreshing them and retrying")
            apt.update()
            try:
                plan, debs = apt.resolve_and_fetch(names)
            except _ListsMayBeStale as again:
                raise AptError(str(again)) from None
    return [(d.name, p) for d, p in zip(plan, debs, strict=True)]


def unpack_packages(
    packages: Sequence[str],
    dest: Path,
    *,
    cache_dir: Path,
    log: Callable[[str], None],
) -> None:
    """`fetch_packages`, then unpack them into ``dest`` (a layer laid out as the
    sandbox's root) with ``dpkg-deb -x``, running no maintainer script: the way
    of a server that has no build sandbox (not isolated). Progress goes to
    ``log`` line by line."""
    t0 = time.monotonic()
    fetched = fetch_packages(packages, cache_dir=cache_dir, log=log)
    if not fetched:
        return
    plan = [_Deb(name, "", "") for name, _ in fetched]
    _unpack(plan, [p for _, p in fetched], Path(dest), log)
    log(f"apt: {' '.join(_validate_names(packages))} done in {time.monotonic() - t0:.1f} s")


# ----- installing in a build sandbox ---------------------------------------------------

#: Where the build sandbox sees the fetched packages.
DEBS_AT = "/run/prefect-modal-debs"
#: The host's state dpkg and its maintainer scripts read, copied into the build
#: sandbox's root (`seed_dpkg_state`): dpkg's database (what is installed, the
#: alternatives) and debconf's answers and templates (not its passwords).
_SEEDED = ("var/lib/dpkg", "var/cache/debconf/config.dat", "var/cache/debconf/templates.dat")
#: What the layer keeps of that state: the alternatives update-alternatives
#: registered (the rest is the host's, which every sandbox reads from its own base).
_KEPT_STATE = "var/lib/dpkg/alternatives"


def seed_dpkg_state(seed: Path) -> None:
    """A layer (``seed``) holding a copy of this machine's dpkg and debconf state,
    for the build sandbox where dpkg installs an ``apt_install``'s packages."""
    for rel in _SEEDED:
        src = Path("/") / rel
        dst = seed / rel
        if src.is_dir():
            layers.copy_tree(src, dst)
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def dpkg_install_argv(debs: Sequence[str]) -> list[str]:
    """dpkg installing ``debs`` (paths in the build sandbox) as apt-get would:
    unpacked in this order, configured in dependency order (maintainer scripts
    and triggers run), configuration files as the packages ship them."""
    return [
        "dpkg",
        "--log=/dev/null",
        "--force-confdef",
        "--force-confold",
        "--force-unsafe-io",
        "--install",
        *debs,
    ]


def finish_layer(fs: Path, uppers: dict[str, Path]) -> None:
    """Make the build sandbox's root (``fs``) the layer: each writable overlay's
    upper directory (what dpkg changed under ``/usr``, ``/etc``, whiteouts
    included) takes its place in it, the fetched packages' mount point and the
    seeded dpkg state (but `_KEPT_STATE`) are dropped."""
    for path, upper in uppers.items():
        target = fs / path.strip("/")
        if target.is_dir() and not target.is_symlink():
            os.rmdir(target)  # the empty mount point the container made
        os.rename(upper, target)
        shutil.rmtree(layers.overlay_workdir(upper), ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(fs / DEBS_AT.strip("/"))
    dpkg_dir = fs / "var/lib/dpkg"
    if dpkg_dir.is_dir():
        for entry in dpkg_dir.iterdir():
            if str(entry.relative_to(fs)) == _KEPT_STATE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    shutil.rmtree(fs / "var/cache/debconf", ignore_errors=True)


_ARCHIVE_FAILED = re.compile(r"^dpkg: error processing archive (\S+)", re.M)
_PACKAGE_FAILED = re.compile(r"^dpkg: error processing package (\S+)", re.M)


def check_dpkg(code: int, output: str, names: Sequence[str], log: Callable[[str], None]) -> None:
    """Judge dpkg's run in the build sandbox. A package that could not be unpacked
    fails the build (AptError naming it, with dpkg's words); one whose maintainer
    script failed is a warning naming it (its files are in the layer; what the
    script sets up may be missing: e.g. a user, since the sandbox's
    ``/etc/shadow`` is masked)."""
    archives = _ARCHIVE_FAILED.findall(output)
    said = _dpkg_says(output)
    if archives:
        which = ", ".join(os.path.basename(a) for a in archives)
        raise AptError(
            f"apt_install({', '.join(names)}): dpkg cannot unpack {which} over this "
            f"machine's packages: {said}"
        )
    failed = list(dict.fromkeys(_PACKAGE_FAILED.findall(output)))
    if failed:
        log(
            f"apt: warning: the maintainer scripts of {', '.join(failed)} failed in the build "
            f"sandbox ({said}); their files are in the image, what the scripts set up may be "
            "missing and the package may not work as on Modal"
        )
    elif code != 0:
        raise AptError(
            f"apt_install({', '.join(names)}): dpkg failed with exit code {code} in the build "
            f"sandbox: {said}"
        )


def _dpkg_says(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or ln.startswith("dpkg:")]
    return " / ".join((errors or lines)[-8:]) or "no output"


# ----- apt-get with private state -------------------------------------------------------


class _PrivateApt:
    """apt-get reading this machine's sources and dpkg status, writing only under ``cache``."""

    def __init__(self, cache: Path, log: Callable[[str], None]) -> None:
        self.cache = cache.absolute()
        self.log = log
        self.lists = self.cache / "lists"
        self.archives = self.cache / "archives"
        self.stamp = self.cache / "lists.updated"
        for d in (self.lists / "partial", self.archives / "partial", self.cache / "apt-cache"):
            d.mkdir(parents=True, exist_ok=True)
        (self.cache / "log").mkdir(exist_ok=True)
        self.conf = self.cache / "apt.conf"
        self.conf.write_text(self._config())

    def _config(self) -> str:
        c = self.cache
        # hooks of the host's apt.conf.d (docker-clean, packagekit, appstream) would
        # act on the host's files: cleared for these runs
        cleared = [
            "APT::Update::Pre-Invoke",
            "APT::Update::Post-Invoke",
            "APT::Update::Post-Invoke-Success",
            "DPkg::Pre-Invoke",
            "DPkg::Post-Invoke",
            "DPkg::Pre-Install-Pkgs",
        ]
        lines = [f"#clear {k};" for k in cleared]
        lines += [
            f'Dir::State::Lists "{self.lists}/";',
            f'Dir::State::extended_states "{c}/extended_states";',
            f'Dir::Cache "{c}/apt-cache/";',
            f'Dir::Cache::archives "{self.archives}/";',
            # apt's binary cache of the lists: without it each run parses them again
            # (seconds); the host may turn it off (docker-clean), ours is private
            'Dir::Cache::pkgcache "pkgcache.bin";',
            'Dir::Cache::srcpkgcache "srcpkgcache.bin";',
            f'Dir::Log "{c}/log";',
            'APT::Sandbox::User "root";',
            'APT::Install-Recommends "false";',
            'Acquire::http::Timeout "30";',
            'Acquire::Retries "2";',
        ]
        if os.geteuid() != 0:
            # a normal user's server: apt-get would take this machine's dpkg lock, which only
            # root may; our lists and archives are private and `locked` serialises their use
            lines.append('Debug::NoLocking "true";')
        return "\n".join(lines) + "\n"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One apt run per cache at a time (two builds may share it)."""
        with open(self.cache / "build.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "APT_CONFIG"}
        env.update(LC_ALL="C", LANG="C", DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "-c", str(self.conf), "-q", *args]
        try:
            return subprocess.run(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                timeout=APT_TIMEOUT_S,
            )
        except FileNotFoundError:
            raise AptError(
                "apt_install: apt-get is not on this machine: the local server unpacks Debian "
                "packages with apt-get and dpkg-deb, so it needs a Debian or Ubuntu host"
            ) from None
        except subprocess.TimeoutExpired:
            raise AptError(
                f"apt_install: apt-get {args[0]!r} did not finish in {APT_TIMEOUT_S} s: check "
                "the network and the mirror in /etc/apt/sources.list*"
            ) from None

    # --- package lists

    def _has_lists(self) -> bool:
        return any("_Packages" in p.name for p in self.lists.iterdir())

    def lists_older_than(self, seconds: float) -> bool:
        return not self.stamp.exists() or time.time() - self.stamp.stat().st_mtime > seconds

    def lists_stale(self) -> bool:
        if not self.stamp.exists() or not self._has_lists():
            return True
        made = self.stamp.stat().st_mtime
        if time.time() - made > LISTS_MAX_AGE_S:
            return True
        sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
        return any(p.exists() and p.stat().st_mtime > made for p in sources)

    def update(self) -> None:
        self.log(f"apt: updating package lists (private, in {self.lists})")
        t0 = time.monotonic()
        out = self.run("update")
        failed = out.returncode != 0 or any(
            line.startswith(("E:", "W: Failed", "Err:")) for line in out.stdout.splitlines()
        )
        if failed:
            said = _apt_says(out.stdout)
            if self._has_lists():
                self.log(
                    f"apt: warning: cannot refresh the package lists ({said}); using those at hand"
                )
                return
            raise AptError(
                "apt_install: cannot fetch Debian's package lists from this machine's sources: "
                f"apt-get update says: {said}. Check the network and the mirror in "
                "/etc/apt/sources.list*"
            )
        self.stamp.touch()
        size = sum(p.stat().st_size for p in self.lists.iterdir() if p.is_file())
        self.log(f"apt: package lists updated ({_size(size)}) in {time.monotonic() - t0:.1f} s")

    # --- resolving and fetching

    def _install_args(self, names: list[str]) -> list[str]:
        # --reinstall: the named packages are fetched even when this machine has them
        return ["--no-install-recommends", "--reinstall", "--allow-downgrades", "install", *names]

    def plan(self, names: list[str]) -> tuple[list[str], list[_Deb]]:
        """What apt would install for ``names``, and the names as asked (some pinned)."""
        out = self.run("-s", *self._install_args(names))
        pinned = self._pin_undownloadable(names, out.stdout)
        if pinned != names:
            names = pinned
            out = self.run("-s", *self._install_args(names))
        if out.returncode != 0:
            raise _resolve_error(names, out.stdout)
        plan: list[_Deb] = []
        removed: list[str] = []
        for line in out.stdout.splitlines():
            m = _INST.match(line)
            if m:
                plan.append(_Deb(m.group(1), m.group(2), m.group(3).split()[0]))
            m = _REMV.match(line)
            if m:
                removed.append(m.group(1))
        if removed:
            self.log(
                f"apt: warning: Debian would remove {', '.join(removed)} to install these; the "
                "base is this machine's read-only userland, so those stay (dpkg may refuse to "
                "install over them, which fails the build)"
            )
        if not plan:
            raise AptError(
                f"apt_install({', '.join(names)}): apt-get plans nothing to install: "
                f"{_apt_says(out.stdout)}"
            )
        return names, plan

    def _pin_undownloadable(self, names: list[str], simulated: str) -> list[str]:
        """Pin to the sources' version each package whose installed version no source has.

        Why: the image stands on this machine's userland, whose dpkg may hold a package
        from elsewhere (a newer ``nodejs`` from another vendor, say). ``--reinstall`` then
        fails ("Reinstallation of nodejs is not possible, it cannot be downloaded"),
        while on Modal, whose base image lacks it, ``apt_install("nodejs")`` installs
        Debian's. ``name=version`` asks apt for the sources' own version instead.
        """
        stuck = set(re.findall(r"Reinstallation of (\S+) is not possible", simulated))
        if not stuck:
            return names
        pinned = []
        for name in names:
            version = self._downloadable_version(name) if name in stuck else None
            pinned.append(f"{name}={version}" if version else name)
        self.log(
            "apt: this machine has "
            + ", ".join(sorted(stuck))
            + " from no source apt knows; the layer gets the sources' version, as Modal's "
            "image would: " + " ".join(p for p in pinned if "=" in p)
        )
        return pinned

    def _downloadable_version(self, name: str) -> str | None:
        """The highest version of ``name`` that a package source offers (apt-cache madison)."""
        env = {k: v for k, v in os.environ.items() if k != "APT_CONFIG"}
        env.update(LC_ALL="C", LANG="C")
        out = subprocess.run(
            ["apt-cache", "-c", str(self.conf), "madison", name],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=APT_TIMEOUT_S,
        )
        for line in out.stdout.splitlines():  # newest first
            fields = [f.strip() for f in line.split("|")]
            if len(fields) == 3 and fields[0] == name:
                return fields[1]
        return None

    def resolve_and_fetch(self, names: list[str]) -> tuple[list[_Deb], list[Path]]:
        t0 = time.monotonic()
        names, plan = self.plan(names)
        self.log(
            f"apt: {len(plan)} package{'s' if len(plan) > 1 else ''} for {' '.join(names)}: "
            + ", ".join(f"{d.name} {d.version}" for d in plan)
            + f" (resolved in {time.monotonic() - t0:.1f} s; what this machine has is not fetched)"
        )
        missing = [d for d in plan if not (self.archives / d.filename).exists()]
        if missing:
            self.log(f"apt: fetching {len(missing)}: {', '.join(d.name for d in missing)}")
            t0 = time.monotonic()
            out = self.run("-y", "--download-only", *self._install_args(names))
            if out.returncode != 0:
                said = _apt_says(out.stdout)
                if "404" in out.stdout or "Failed to fetch" in out.stdout:
                    raise _ListsMayBeStale(
                        f"apt_install({', '.join(names)}): cannot fetch the packages: {said}. "
                        "Check the network and the mirror in /etc/apt/sources.list*"
                    )
                raise AptError(f"apt_install({', '.join(names)}): apt-get fails: {said}")
            fetched = sum(
                (self.archives / d.filename).stat().st_size
                for d in missing
                if (self.archives / d.filename).exists()
            )
            self.log(
                f"apt: fetched {len(missing)} package{'s' if len(missing) > 1 else ''} "
                f"({_size(fetched)}) in {time.monotonic() - t0:.1f} s"
            )
        debs = [self.archives / d.filename for d in plan]
        gone = [d.filename for d, p in zip(plan, debs, strict=True) if not p.exists()]
        if gone:
            raise AptError(
                f"apt_install({', '.join(names)}): apt-get reported success but "
                f"{', '.join(gone)} is not in {self.archives}: remove that directory and retry"
            )
        if not missing:
            total = sum(p.stat().st_size for p in debs)
            self.log(f"apt: all {len(debs)} in the cache ({_size(total)}), nothing fetched")
        return plan, debs


def _apt_says(output: str) -> str:
    """apt's error lines (else its last lines), in one line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("E:", "W:", "Err:"))]
    picked = errors or lines[-5:]
    return " / ".join(picked[-8:]) or "no output"


def _resolve_error(names: list[str], output: str) -> AptError:
    missing = re.findall(r"^E: Unable to locate package (\S+)", output, re.M)
    if missing:
        which = ", ".join(repr(m) for m in missing)
        return _ListsMayBeStale(
            f"apt_install: no Debian package named {which} in this machine's package sources "
            "(/etc/apt/sources.list*): check the name (`apt-cache search <word>` lists "
            "candidates) or add the source that has it"
        )
    no_candidate = re.findall(r"^E: Package '([^']+)' has no installation candidate", output, re.M)
    if no_candidate:
        which = ", ".join(repr(m) for m in no_candidate)
        return AptError(
            f"apt_install: {which} has no installable version (a virtual package, or one only "
            f"named by others): apt says: {_apt_says(output)}. Install a package that provides it"
        )
    bad_version = re.findall(r"^E: Version '([^']+)' for '([^']+)' was not found", output, re.M)
    if bad_version:
        which = ", ".join(f"{n}={v}" for v, n in bad_version)
        return _ListsMayBeStale(
            f"apt_install: version {which} is not in this machine's package sources: pin a "
            "version they have (`apt-cache policy <name>`) or none"
        )
    return AptError(
        f"apt_install({', '.join(names)}): apt cannot resolve these against this machine's "
        f"packages: {_apt_says(output)}"
    )


# ----- unpacking -------------------------------------------------------------------------


def _unpack(plan: list[_Deb], debs: list[Path], dest: Path, log: Callable[[str], None]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    etc_before = _files_under(dest / "etc")
    for deb, path in zip(plan, debs, strict=True):
        for script, commands in _script_effects(path).items():
            log(
                f"apt: warning: {deb.name}'s {script} does more than ldconfig/triggers "
                f"({'; '.join(commands)}); the local server never runs maintainer scripts, so "
                "what it sets up (users, alternatives, services, generated files) is missing "
                "here and the package may not work as on Modal"
            )
        out = subprocess.run(
            ["dpkg-deb", "-x", str(path), str(dest)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
        )
        if out.returncode != 0:
            raise AptError(
                f"apt_install: cannot unpack {deb.name} ({path.name}): "
                f"{out.stderr.strip() or out.stdout.strip()}. Remove it from {path.parent} "
                "and retry"
            )
        _fold_into_usr(dest)
    size = sum(p.stat().st_size for p in debs)
    log(
        f"apt: unpacked {len(debs)} package{'s' if len(debs) > 1 else ''} ({_size(size)}) "
        f"in {time.monotonic() - t0:.1f} s"
    )
    etc = sorted(_files_under(dest / "etc") - etc_before)
    if etc:
        shown = ", ".join("/etc/" + p for p in etc[:5]) + (" ..." if len(etc) > 5 else "")
        log(
            f"apt: note: {len(etc)} file{'s' if len(etc) > 1 else ''} under /etc ({shown}): the "
            "sandbox shows them read-only over this machine's /etc; a program that changes "
            "its /etc files at run time cannot"
        )


def _files_under(top: Path) -> set[str]:
    if not top.is_dir():
        return set()
    found: set[str] = set()
    for here, _dirs, files in os.walk(top):
        for name in files:
            found.add(os.path.relpath(os.path.join(here, name), top))
    return found


def _fold_into_usr(dest: Path) -> None:
    """On a merged-/usr host (``/bin -> usr/bin``), move what a package put
    under ``dest/bin`` into ``dest/usr/bin``: a real ``bin`` directory in the
    layer would replace the sandbox's ``/bin`` symlink, hiding the host's."""
    for alias in _USR_ALIASES:
        host = Path("/") / alias
        here = dest / alias
        if not host.is_symlink() or here.is_symlink() or not here.is_dir():
            continue
        target = os.path.normpath(os.path.join("/", os.readlink(host)))
        layers.copy_tree(here, dest / target.lstrip("/"))
        shutil.rmtree(here)


def _script_effects(deb: Path) -> dict[str, list[str]]:
    """The commands a package's preinst / postinst would run beyond the harmless ones."""
    out = subprocess.run(
        ["dpkg-deb", "--ctrl-tarfile", str(deb)], stdin=subprocess.DEVNULL, capture_output=True
    )
    if out.returncode != 0:
        raise AptError(
            f"apt_install: {deb.name} is not a readable Debian package: "
            f"{out.stderr.decode(errors='replace').strip()}. Remove it and retry"
        )
    found: dict[str, list[str]] = {}
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
        for member in tar.getmembers():
            name = member.name.lstrip("./")
            if name not in ("preinst", "postinst") or not member.isfile():
                continue
            f = tar.extractfile(member)
            if f is None:
                continue
            commands = _effectful_commands(f.read().decode(errors="replace"))
            if commands:
                found[name] = commands
    return found


def _effectful_commands(script: str) -> list[str]:
    """The names of the commands a maintainer script runs that are not shell
    structure, tests, its own functions or `_HARMLESS` (up to four, in order).
    A heuristic: it reads lines, not the shell's grammar (continuation lines
    and here-documents are skipped), and errs towards naming more."""
    functions = set(_FUNCTION.findall(script))
    found: list[str] = []
    heredoc: str | None = None
    continued = False
    for raw in script.splitlines():
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        was_continued, continued = continued, raw.rstrip().endswith("\\")
        marker = _HEREDOC.search(raw)
        if marker:
            heredoc = marker.group(1)
        if was_continued or raw.lstrip().startswith("#"):
            continue
        line = _CASE_LABEL.sub("", re.sub(r"\s#.*$", "", raw), count=1)
        for piece in re.split(r";;|;|&&|\|\||\|", line):
            words = piece.split()
            while words and (words[0] in _SHELL_WORDS or _ASSIGNMENT.match(words[0])):
                words.pop(0)
            if not words or words[0] in ("case", "for", "select"):
                continue
            first = words[0]
            if not _COMMAND_NAME.fullmatch(first) or first in _HARMLESS or first in functions:
                continue
            if first == "dpkg" and words[1:2] == ["--compare-versions"]:
                continue
            if first not in found:
                found.append(first)
            if len(found) == 4:
                return found
    return found


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    if n < 1000**2:
        return f"{n / 1000:.1f} kB"
    return f"{n / 1000**2:.1f} MB"


__all__ = [
    "DEBS_AT",
    "AptError",
    "check_dpkg",
    "dpkg_install_argv",
    "fetch_packages",
    "finish_layer",
    "seed_dpkg_state",
    "unpack_packages",
]
