"""What the rooms share: state, credentials, authentication, sandbox lookups and creation."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import posixpath
import re
import shutil
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpclib.events
from grpclib import Status
from grpclib.server import Stream
from modal_proto import api_pb2

from .. import ids
from ..auth import Credentials
from ..blobs import BlobStore
from ..build import pip as pip_build
from ..build.builder import Builder, ImageState, Log
from ..build.cache import LayerCache
from ..limits import CREATE_RATE_ENV, MAX_GPUS_ENV, MAX_SANDBOXES_ENV, Limits, gpu_count
from ..runtime import isolation as isolation_mod
from ..runtime import layers, processes, seccomp_filter, userns
from ..runtime.cgroups import Cgroups
from ..runtime.forkserver import ForkServer
from ..runtime.isolation import ImageView, pasta, why_not_isolated
from ..runtime.netns_pool import NetnsPool
from ..runtime.network import NO_PASTA_WARNING, Forward, build_forwards
from ..runtime.network import plan as plan_forwards
from ..runtime.probes import ProbeRunner
from ..runtime.relay import Network
from ..runtime.sandbox import (
    DEFAULT_TIMEOUT_S,
    MAX_TIMEOUT_S,
    Isolation,
    LocalSandbox,
    SandboxPaths,
    SandboxRequest,
)
from ..runtime.tunnels import TunnelManager
from ..runtime.volume_views import make_view
from ..state import APP_STOPPED, Registry
from .base import fail

log = logging.getLogger("prefect_modal.local")

VERIFIED_CLIENT_VERSIONS: tuple[str, ...] = ("1.6.4",)
IMAGE_BUILDER_VERSION = "2024.10"
_ROUTER_PREFIX = "/modal.task_command_router.TaskCommandRouter/"
LIST_PAGE = 100
MAX_WAIT_S = 55.0


class ClientVersionWarning(UserWarning):
    """The connecting modal client is not a version this server was verified with."""


def gpu_string(cfg: api_pb2.GPUConfig) -> str | None:
    kind = cfg.gpu_type
    if not kind and cfg.type:
        kind = api_pb2.GPUType.Name(cfg.type).removeprefix("GPU_TYPE_")
    if not kind:
        return None
    return f"{kind}:{cfg.count}" if cfg.count and cfg.count > 1 else kind


_PORT_FIELDS = {False: "encrypted_ports", True: "unencrypted_ports"}


def _port_field(spec: api_pb2.PortSpec) -> str:
    if spec.tunnel_type == api_pb2.TUNNEL_TYPE_H2:
        return "h2_ports"
    return _PORT_FIELDS[spec.unencrypted]


def validate_ports(d: api_pb2.Sandbox) -> list[api_pb2.PortSpec]:
    """The ports to tunnel: each in range and named once across the three lists."""
    seen: dict[int, str] = {}
    ports = list(d.open_ports.ports) if d.HasField("open_ports") else []
    for spec in ports:
        where = _port_field(spec)
        if not 1 <= spec.port <= 65535:
            fail(
                Status.INVALID_ARGUMENT,
                f"{where}: port {spec.port} is out of range; ports are 1 to 65535",
            )
        if spec.port in seen:
            fail(
                Status.INVALID_ARGUMENT,
                f"{where}: port {spec.port} is already listed in {seen[spec.port]}; "
                "a port can be tunneled once",
            )
        seen[spec.port] = where
    return ports


def validate_inbound_cidrs(d: api_pb2.Sandbox) -> list[Network]:
    """``inbound_cidr_allowlist``: enforced by every tunnel and connect token."""
    nets: list[Network] = []
    for cidr in d.inbound_cidr_allowlist:
        try:
            nets.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            fail(
                Status.INVALID_ARGUMENT,
                f"inbound_cidr_allowlist: {cidr!r} is not a CIDR range "
                "(e.g. '127.0.0.1/32' or '10.0.0.0/8')",
            )
    return nets


_OBJECT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def validate_sandbox_name(name: str) -> None:
    """Modal's object-name rule for a sandbox's name: at most 64 of ``[A-Za-z0-9._-]``
    and not an App id (``modal/_utils/name_utils.py``, ``is_valid_object_name``). The
    1.6.4 client checks it before sending; the server checks again for other clients,
    with the client's words."""
    if _OBJECT_NAME.fullmatch(name) is None or re.fullmatch(r"ap-[a-zA-Z0-9]{22}", name):
        fail(
            Status.INVALID_ARGUMENT,
            f"Invalid Sandbox name: '{name}'.\n\nNames may contain only alphanumeric "
            "characters, dashes, periods, and underscores, must be shorter than 64 "
            "characters, and cannot conflict with App ID strings.",
        )


def validate_probe(d: api_pb2.Sandbox) -> api_pb2.Probe | None:
    if not d.HasField("readiness_probe"):
        return None
    p = d.readiness_probe
    if p.HasField("exec_command"):
        if not p.exec_command.argv:
            fail(Status.INVALID_ARGUMENT, "readiness_probe: Probe.with_exec() needs a command")
    elif not 1 <= p.tcp_port <= 65535:
        fail(
            Status.INVALID_ARGUMENT,
            f"readiness_probe: tcp port {p.tcp_port} is out of range; ports are 1 to 65535",
        )
    return p


def _registry_notice(state: ImageState | None) -> str:
    if state is None or state.kind != "host" or not state.registry:
        return ""
    return (
        f"[prefect-modal local] image {state.registry!r} could not be pulled here: this "
        "sandbox runs on this machine's userland and the local server's Python instead\n"
    )


def _top(path: str, view: ImageView) -> str:
    for d in (*view.dirs, *view.host_dirs):
        if path == d or path.startswith(d.rstrip("/") + "/"):
            return d
    return path


def _small_text_files(paths: Iterable[Path], limit: int = 1 << 16) -> list[str]:
    """The text of the small regular files among ``paths`` (a build step's configuration:
    uv.toml, a requirements file), where an index URL may be written."""
    texts = []
    for path in paths:
        try:
            if path.is_file() and path.stat().st_size <= limit:
                texts.append(path.read_text(errors="replace"))
        except OSError:
            continue
    return texts


class ServerContext:
    """What both services share: state, credentials, settings."""

    def __init__(
        self,
        registry: Registry,
        creds: Credentials,
        *,
        refuse_gpu: bool,
        server_uid: str,
        fork_server: bool = True,
        isolation: bool = True,
        host_dirs: Sequence[str] = (),
        host: str = "127.0.0.1",
        latency: Any = None,
        image_cache: Path | None = None,
        limits: Limits | None = None,
    ) -> None:
        #: the workspace's throttle, caps and output window (`local.limits`)
        self.limits = limits if limits is not None else Limits()
        #: `latency.LatencyModel` or None: Modal-like delays for benchmarks (off by default)
        self.latency = latency
        self.registry = registry
        self.creds = creds
        self.refuse_gpu = refuse_gpu
        self.server_uid = server_uid
        self.url = ""
        self.sweeper = processes.Sweeper()
        self.forkserver = ForkServer(registry.state_dir, warm=fork_server)
        self.isolation_requested = isolation
        self.host_dirs = list(host_dirs)
        #: set by `start_isolation`: how sandboxes are isolated, or why they are not
        self.isolation: Isolation | None = None
        self.not_isolated_because: str | None = None
        #: set by `start_limits`: the cgroups that hold sandboxes to their limits
        self.cgroups: Cgroups | None = None
        self._warned_versions: set[str] = set()
        self.tunnels = TunnelManager(registry.state_dir, host)
        self.probes = ProbeRunner()
        self.blobs = BlobStore(registry.state_dir, host)
        self.builder = Builder(LayerCache(image_cache), self.run_build_command)
        self._background: set[asyncio.Task[None]] = set()

    def spawn_background(self, coro: Any) -> None:
        """Run ``coro`` on the server's loop, kept referenced until it ends (image builds)."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def start_isolation(self) -> None:
        """Find out once, at server start, whether sandboxes can be isolated; say so if not."""
        why = why_not_isolated(self.isolation_requested)
        if why is None and not await self.forkserver.start_launcher():
            why = isolation_mod.refused_because()
        if why is None:
            view = await asyncio.to_thread(
                ImageView.of_this_machine, self.registry.state_dir, self.host_dirs
            )
            idmap = userns.for_this_process() if self.forkserver.launcher_userns else None
            self.isolation = Isolation(view=view, pasta=pasta(), idmap=idmap)
            if idmap is not None:
                log.info("sandboxes get a user namespace each: %s", idmap.describe())
                if not idmap.full:
                    log.warning(
                        "sandboxes of this local Modal server cannot give files to users "
                        "other than root (apt_install needs that): %s",
                        userns.missing_range_help(),
                    )
            else:
                log.warning(
                    "the local Modal server cannot make user namespaces (%s): root inside "
                    "a sandbox is root on this machine, with a container's capabilities",
                    isolation_mod.why_no_userns() or isolation_mod.refused_because(),
                )
            seccomp_filter.announce()
            if self.isolation.pasta is None:
                log.warning(NO_PASTA_WARNING)
            elif os.geteuid() == 0:  # making a namespace needs root (`netns_pool`)
                self.isolation.netns = NetnsPool(self.registry.state_dir / "pasta-pool.log")
                self.isolation.netns.start()
            if view.host_dirs:
                log.warning(
                    "sandboxes of this local Modal server see these host directories "
                    "read-only (the local stand-in for an image that holds your code): %s",
                    ", ".join(view.host_dirs),
                )
            return
        self.not_isolated_because = why
        self.builder.run_in_sandbox = None  # no build sandbox: builds say what runs here
        log.warning(
            "the local Modal server cannot isolate sandboxes (%s): they run as process groups "
            "on this machine with its files, processes and network; block_network and pty "
            "are refused",
            why,
        )
        if self.host_dirs:
            log.warning(
                "host_dirs (%s) has no effect: sandboxes that are not isolated see all of "
                "this machine's files",
                ", ".join(self.host_dirs),
            )

    async def start_limits(self) -> None:
        """Find out once, at server start, which sandbox limits this machine lets us
        enforce with cgroups (`runtime.cgroups`); say which are not."""
        self.cgroups = await asyncio.to_thread(
            Cgroups.probe,
            self.server_uid,
            root=self.limits.cgroup_root,
            pids_limit=self.limits.pids_limit,
        )
        self.cgroups.strict_requests = self.limits.strict_requests
        if self.cgroups.missing:
            log.warning("%s", self.cgroups.announcement())
        else:
            log.info("%s", self.cgroups.announcement())

    async def stop_limits(self) -> None:
        """Server stop: every sandbox group and this server's parents go."""
        if self.cgroups is not None:
            loop = asyncio.get_running_loop()
            for group in self.cgroups.groups.values():
                if group.eventfd is not None:
                    loop.remove_reader(group.eventfd)
            await asyncio.to_thread(self.cgroups.close)

    # ----- auth hook -------------------------------------------------------

    async def on_request(self, event: grpclib.events.RecvRequest) -> None:
        if self.latency is not None and self.latency.rpc_round_trip_s:
            await asyncio.sleep(self.latency.rpc_round_trip_s)
        md = event.metadata
        name = event.method_name
        if name.startswith(_ROUTER_PREFIX):
            auth = str(md.get("authorization", ""))
            token = auth.removeprefix("Bearer ").strip()
            if not token or self.creds.verify_jwt(token) is None:
                fail(Status.UNAUTHENTICATED, "missing or invalid command router token")
            return
        version = str(md.get("x-modal-client-version", ""))
        if (
            version
            and version not in VERIFIED_CLIENT_VERSIONS
            and version not in self._warned_versions
        ):
            self._warned_versions.add(version)
            msg = (
                f"modal client {version} connected; the local Modal server is verified with "
                f"{', '.join(VERIFIED_CLIENT_VERSIONS)} only: some calls may fail"
            )
            log.warning(msg)
            warnings.warn(msg, ClientVersionWarning, stacklevel=1)
        token_id = md.get("x-modal-token-id")
        token_secret = md.get("x-modal-token-secret")
        if not self.creds.check_tokens(
            str(token_id) if token_id else None, str(token_secret) if token_secret else None
        ):
            fail(Status.UNAUTHENTICATED, "invalid or missing Modal token for the local server")

    def check_router_task(self, stream: Stream[Any, Any], task_id: str) -> LocalSandbox:
        md = stream.metadata or {}
        token = str(md.get("authorization", "")).removeprefix("Bearer ").strip()
        if self.creds.verify_jwt(token) != task_id:
            fail(Status.UNAUTHENTICATED, "command router token is not valid for this task")
        sb = self.registry.by_task.get(task_id)
        if sb is None:
            fail(Status.NOT_FOUND, self.registry.missing("task", task_id))
        return sb

    # ----- lookups ---------------------------------------------------------

    def sandbox(self, sandbox_id: str) -> LocalSandbox:
        sb = self.registry.sandboxes.get(sandbox_id)
        if sb is None:
            fail(Status.NOT_FOUND, self.registry.missing("Sandbox", sandbox_id))
        return sb

    def router_access(self, sb: LocalSandbox) -> tuple[str, str]:
        return self.url, self.creds.mint_jwt(sb.task_id)

    # ----- image builds ----------------------------------------------------

    async def run_build_command(
        self,
        argv: list[str],
        env: dict[str, str],
        workdir: str,
        root: Path,
        image_layers: list[Path],
        ro_dirs: list[str],
        rw: dict[str, Path],
        log: Log,
        uppers: dict[str, Path] | None = None,
        ro: dict[str, Path] | None = None,
    ) -> int:
        """A build command (a ``run_commands`` line, an ``apt_install``'s dpkg, a
        ``pip_install``'s uv) in a build sandbox: the runtime's container over
        ``image_layers``, ``rw`` bound writable, ``ro`` (container path -> host file
        or directory) bound read-only, ``uppers`` (container path -> directory)
        making those read-only view directories writable overlays whose changes
        land in that directory; its root, as left, moved to ``root``."""
        if self.isolation is None:
            raise RuntimeError("build sandboxes need isolation")
        # the index ports a pip step names (uv's arguments, environment and configuration
        # files); a run_commands line opens none, as Modal's builder reaches none of yours
        named = []
        if argv[:1] == [pip_build.UV_AT]:
            named = [*argv, *env.values(), *_small_text_files((ro or {}).values())]
        work = root.parent / "build"
        build_id = "sb-build-" + root.parent.name[:16]
        spec = SandboxRequest(
            version=0,
            app_id="",
            app_name=None,
            name=None,
            args=argv,
            env=env,
            env_names=[],
            secret_names=[],
            workdir=workdir,
            timeout_s=3600.0,
            idle_timeout_s=None,
            cpu=None,
            memory_mib=None,
            memory_max_mib=None,
            gpu=None,
            region=None,
            cloud=None,
            image="build",
            volumes={path: ("image-build", host) for path, host in rw.items()},
            tags={},
            layers=image_layers,
            view=self.isolation.view.for_image(ro_dirs),
            path=env["PATH"].split(":"),
            uppers=dict(uppers or {}),
            binds=dict(ro or {}),
            # a network of its own, as every sandbox's: outbound (pasta), and of this
            # machine's loopback only the index ports the step names (`build_forwards`)
            network="own",
            forwards=build_forwards(named),
        )
        sb = LocalSandbox(
            spec,
            sandbox_id=build_id,
            task_id=build_id,
            paths=SandboxPaths(work),
            marker=f"{self.server_uid}:{build_id}",
            on_change=lambda: None,
            sweeper=self.sweeper,
            forkserver=self.forkserver,
            isolation=self.isolation,
        )
        await sb.start()
        offsets = [0, 0]
        while True:
            finished = sb.done.is_set()
            for i, buf in enumerate((sb.stdout, sb.stderr)):
                data = buf.read(offsets[i], 1 << 20)
                if data:
                    offsets[i] += len(data)
                    log(data.decode(errors="replace"))
            if finished:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(sb.done.wait(), 0.2)
        code = sb.returncode if sb.returncode is not None else -1
        idmap = self.isolation.idmap
        if idmap is not None:
            for path, upper in (uppers or {}).items():
                await asyncio.to_thread(userns.prune_mirrored, path, upper)
                # overlayfs leaves its work directory mode 000: its owner (root inside,
                # which a normal user's server is) must open it to remove it
                with contextlib.suppress(OSError):
                    os.chmod(layers.overlay_workdir(upper) / "work", 0o700)
        if code != 0 and uppers and idmap is not None and os.geteuid() != 0:
            # dpkg gives files to other users (man, _apt...): a one-id map cannot; and it
            # cannot replace this machine's own files (their owner is no one inside)
            log(
                "[prefect-modal local] a normal user's build sandbox cannot replace files of "
                "packages this machine has installed itself (upgrade them on the host, or run "
                "the local server as root)"
                + ("" if idmap.full else f"; nor chown: {userns.missing_range_help()}")
                + "\n"
            )
        await asyncio.to_thread(os.rename, sb.paths.fs, root)
        await asyncio.to_thread(shutil.rmtree, work, True)
        return code

    # ----- sandbox creation ------------------------------------------------

    async def create_sandbox(
        self,
        version: int,
        app_id: str,
        definition: api_pb2.Sandbox,
        tags: list[api_pb2.SandboxTag],
        secret_sources: list[api_pb2.SecretSource],
    ) -> LocalSandbox:
        reg = self.registry
        d = definition
        self._check_limits(d)
        if app_id not in reg.app_names:
            fail(Status.NOT_FOUND, f"App {app_id!r} not found (was the local server restarted?)")
        app = reg.app_info.get(app_id)
        if app is not None and app.state == APP_STOPPED:
            fail(
                Status.FAILED_PRECONDITION, f"App {app_id!r} is stopped: it cannot start sandboxes"
            )
        timeout = d.timeout_secs or DEFAULT_TIMEOUT_S
        if timeout > MAX_TIMEOUT_S:
            fail(
                Status.INVALID_ARGUMENT,
                f"timeout={timeout}s is above the maximum of {MAX_TIMEOUT_S}s (24 h)",
            )
        gpu = gpu_string(d.resources.gpu_config) if d.HasField("resources") else None
        if gpu and self.refuse_gpu:
            fail(
                Status.FAILED_PRECONDITION,
                f"gpu={gpu!r} was requested, but this local Modal server was started with "
                "refuse_gpu=True (--refuse-gpu): it has no GPUs. "
                "Run on Modal, or drop the gpu request.",
            )
        network = self._network_mode(d)
        pty = d.HasField("pty_info") and d.pty_info.enabled
        if pty and self.isolation is None:
            fail(
                Status.FAILED_PRECONDITION,
                f"pty=True needs an isolated sandbox, and this local server cannot isolate "
                f"them ({self.not_isolated_because})",
            )
        name = d.name or None
        if name is not None:
            validate_sandbox_name(name)
        if name is not None and reg.running_with_name(app_id, name) is not None:
            fail(
                Status.ALREADY_EXISTS,
                f"a running Sandbox named {name!r} already exists in this app",
            )

        image = reg.images.get(d.image_id)
        env: dict[str, str] = dict(image.env) if image else {}
        env_names: list[str] = []
        secret_names: list[str] = []

        def add_secret(secret_id: str) -> None:
            info = reg.secrets_by_id.get(secret_id)
            if info is None:
                fail(Status.NOT_FOUND, f"Secret {secret_id!r} not found")
            env.update(info.values)
            if info.name:
                secret_names.append(info.name)
            else:
                env_names.extend(info.values)

        for sid in d.secret_ids:
            add_secret(sid)
        for src in secret_sources:
            if src.secret_id:
                add_secret(src.secret_id)
            else:
                values = dict(src.env.contents)
                env.update(values)
                env_names.extend(values)

        if pty:  # what the client's terminal told Modal to set
            info = d.pty_info
            env.setdefault("TERM", info.env_term or "xterm")
            if info.env_colorterm:
                env.setdefault("COLORTERM", info.env_colorterm)
            if info.env_term_program:
                env.setdefault("TERM_PROGRAM", info.env_term_program)
        volumes: dict[str, tuple[str, Path]] = {}
        v1_mounts: list[str] = []
        for vm in d.volume_mounts:
            vol = reg.volumes_by_id.get(vm.volume_id)
            if vol is None:
                fail(Status.NOT_FOUND, f"Volume {vm.volume_id!r} not found")
            volumes[vm.mount_path] = (vol.name or vol.id, vol.path)
            if vol.version != api_pb2.VOLUME_FS_VERSION_V2:
                v1_mounts.append(vm.mount_path)

        state = image.state if image else None
        if state is not None and state.venv:
            self.forkserver.envs.add(f"{state.venv}/bin")
        view = None
        if state is not None and state.kind == "python" and self.isolation is not None:
            view = self.isolation.view.for_image(state.ro_dirs)
        trees, binds, on_path = self._layers(
            image.layers if image else [], list(d.mount_ids), list(volumes), view
        )
        if on_path and "PYTHONPATH" not in env:
            env["PYTHONPATH"] = "/root"  # as on Modal, where add_local_python_source puts code

        res = d.resources
        cloud = d.cloud_provider_str or (
            api_pb2.CloudProvider.Name(d.cloud_provider).removeprefix("CLOUD_PROVIDER_").lower()
            if d.cloud_provider
            else None
        )
        forwards: list[Forward] = []
        if network == "own":  # the host's loopback ports it is meant to reach
            env, forwards = await plan_forwards(env, self.url, self.blobs.started_url)
        spec = SandboxRequest(
            version=version,
            app_id=app_id,
            app_name=reg.app_names.get(app_id),
            name=name,
            args=list(d.entrypoint_args),
            env=env,
            env_names=sorted(set(env_names)),
            secret_names=list(dict.fromkeys(secret_names)),
            workdir=d.workdir or (state.workdir if state else "") or None,
            timeout_s=float(timeout),
            idle_timeout_s=float(d.idle_timeout_secs) if d.idle_timeout_secs else None,
            cpu=res.milli_cpu / 1000 if res.milli_cpu else None,
            cpu_max=res.milli_cpu_max / 1000 if res.milli_cpu_max else None,
            memory_mib=res.memory_mb or None,
            memory_max_mib=res.memory_mb_max or None,
            gpu=gpu,
            region=",".join(d.scheduler_placement.regions) or None,
            cloud=cloud,
            image=image.description if image else (d.image_id or "default"),
            volumes=volumes,
            tags={t.tag_name: t.tag_value for t in tags},
            network=network,
            forwards=forwards,
            pty=pty,
            pty_size=(d.pty_info.winsz_rows, d.pty_info.winsz_cols) if pty else (0, 0),
            layers=trees,
            binds=binds,
            image_id=d.image_id if image else "",
            view=view,
            path=state.path if state else [],
            notice=_registry_notice(state),
        )
        ports = validate_ports(d)
        allow = validate_inbound_cidrs(d)
        probe = validate_probe(d)
        sandbox_id = ids.new_sandbox_id(version)
        paths = SandboxPaths(reg.state_dir / "sandboxes" / sandbox_id)
        for i, mount_path in enumerate(v1_mounts):
            # a v1 volume: the sandbox writes to a copy, merged in when it ends
            # (`runtime.volume_views`, Modal's guide, Sandbox files)
            spec.volume_views[mount_path] = await asyncio.to_thread(
                make_view, volumes[mount_path][1], paths.root / "v1-volumes" / str(i)
            )
        sb = LocalSandbox(
            spec,
            sandbox_id=sandbox_id,
            task_id=ids.new_task_id(version),
            paths=paths,
            marker=f"{self.server_uid}:{sandbox_id}",
            on_change=reg.changed,
            sweeper=self.sweeper,
            forkserver=self.forkserver,
            isolation=self.isolation,
            not_isolated_because=self.not_isolated_because,
            output_window=self.limits.output_window,
            cgroups=self.cgroups,
        )
        reg.add_sandbox(sb)
        # Modal's create returns once the sandbox is scheduled; its container starts
        # after (the latency model's start delay, see local/latency.py).
        await sb.start(self.latency.start_delay() if self.latency is not None else 0.0)
        try:
            await self.tunnels.open(sb, ports, allow)
        except OSError as exc:
            await sb.terminate()
            fail(
                Status.FAILED_PRECONDITION,
                f"cannot open the tunnels of sandbox {sandbox_id}: {exc.strerror or exc}",
            )
        if probe is not None:
            self.probes.start(sb, probe)
        await reg.flushed()  # the listing shows it before the client hears of it
        log.debug(
            "sandbox %s started (v%d, app %s, name %s, argv[0] %s)",
            sandbox_id,
            version,
            spec.app_name,
            name,
            spec.args[0] if spec.args else "-",
        )
        return sb

    def _check_limits(self, d: api_pb2.Sandbox) -> None:
        """The workspace's creation throttle and caps (`local.limits`; all off by default,
        since Modal publishes no number for them), answered as Modal answers a throttled
        create: RESOURCE_EXHAUSTED, which modal 1.6.4 raises as ResourceExhaustedError."""
        lim = self.limits
        if not lim.take_create():
            fail(
                Status.RESOURCE_EXHAUSTED,
                f"Sandbox creation rate limit exceeded: this workspace may create "
                f"{lim.create_rate:g} sandboxes per second (local server setting "
                f"{CREATE_RATE_ENV} / --create-rate). Retry with backoff.",
            )
        running = [s for s in self.registry.sandboxes.values() if not s.done.is_set()]
        if lim.max_sandboxes and len(running) >= lim.max_sandboxes:
            fail(
                Status.RESOURCE_EXHAUSTED,
                f"Sandbox limit exceeded: this workspace has {len(running)} running sandboxes, "
                f"its limit (local server setting {MAX_SANDBOXES_ENV} / --max-sandboxes). "
                "Wait for some to finish, or terminate them.",
            )
        gpu = gpu_string(d.resources.gpu_config) if d.HasField("resources") else None
        want = gpu_count(gpu)
        if want and lim.max_gpus:
            held = sum(gpu_count(s.spec.gpu) for s in running)
            if held + want > lim.max_gpus:
                # modal/sandbox/_impl_v1.py: a GPU create that finds no capacity within
                # its scheduling timeout raises exactly this; the local server says it
                # at once instead of after 21 minutes.
                fail(
                    Status.RESOURCE_EXHAUSTED,
                    f"Insufficient capacity to create sandbox. ({gpu!r} asked for {want} GPU(s); "
                    f"{held} of this workspace's {lim.max_gpus} are in use: local server "
                    f"setting {MAX_GPUS_ENV} / --max-gpus)",
                )

    def _layers(
        self,
        image_layers: list[Path],
        mount_ids: list[str],
        volume_paths: list[str],
        view: ImageView | None = None,
    ) -> tuple[list[Path], dict[str, Path], bool]:
        """The file trees a new sandbox's root starts with (its image's), the
        read-only binds of its mounts (``add_local_*`` without ``copy``), and
        whether code lands in /root.

        A mount is bound read-only, as on Modal, at its top-most directories or
        files that are not directories the root must keep (`layers.bind_roots`);
        one that would overlap a volume or another mount's binds is copied into
        the root instead. A sandbox that is not isolated sees the host's files,
        so such an image is refused for it."""
        if self.isolation is None and (image_layers or mount_ids):
            fail(
                Status.FAILED_PRECONDITION,
                "this image has files of its own (local files or a snapshot), and a sandbox "
                "sees them at their paths only when isolated; this local server cannot isolate "
                f"sandboxes ({self.not_isolated_because})",
            )
        trees = list(image_layers)
        binds: dict[str, Path] = {}
        on_path = False
        shared = {"/" + d for d in isolation_mod.ROOT_DIRS}
        if self.isolation is not None:
            view = view or self.isolation.view
            for p in [*view.dirs, *view.host_dirs, *view.masked, *volume_paths]:
                parts = [x for x in layers.abs_path(p).split("/") if x]
                shared.update("/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1))
        for mount_id in mount_ids:
            mount = self.registry.mounts.get(mount_id)
            if mount is None:
                fail(Status.NOT_FOUND, f"Mount {mount_id!r} not found (was the server restarted?)")
            on_path = on_path or any(p.startswith("/root/") for p in mount.paths)
            roots = layers.bind_roots(mount.tree, shared) if self.isolation is not None else []
            taken = [*binds, *volume_paths]
            if not roots or any(
                layers.under(r, t) or layers.under(t, r) for r in roots for t in taken
            ):
                trees.append(mount.tree)
                continue
            for r in roots:
                binds[r] = mount.tree / r.lstrip("/")
        return trees, binds, on_path

    def readonly_problem(self, remote_path: str) -> str | None:
        """Why local files cannot be placed at ``remote_path`` in an isolated sandbox, or None."""
        if self.isolation is None:
            return None
        norm = layers.abs_path(remote_path)
        for link, target in self.isolation.view.symlinks.items():  # /bin -> usr/bin
            if layers.under(norm, link):
                real = posixpath.join(posixpath.dirname(link), target)
                norm = layers.abs_path(real + norm[len(link) :])
                break
        if self.isolation.view.resolve_readonly(norm) is not None:
            return (
                f"{remote_path!r} is inside {_top(norm, self.isolation.view)!r}, which the local "
                "Modal server shows read-only from this machine (it stands in for the image), so "
                "local files cannot be placed there: choose another remote path (e.g. under "
                "/root or /opt)"
            )
        return None

    def _network_mode(self, d: api_pb2.Sandbox) -> str:
        """ "host", "none" or "own" (see `runtime.sandbox`); what cannot be had is refused."""
        access = d.network_access if d.HasField("network_access") else None
        kind = access.network_access_type if access is not None else 0
        if kind == api_pb2.NetworkAccess.NetworkAccessType.ALLOWLIST or (
            access is not None and (access.allowed_cidrs or access.allowed_domains)
        ):
            allowed = [*access.allowed_cidrs, *access.allowed_domains] if access else []
            fail(
                Status.FAILED_PRECONDITION,
                f"outbound allowlists ({', '.join(allowed)}) are not enforced by the local "
                "Modal server, so they are refused rather than ignored: test them on Modal, "
                "or use block_network=True",
            )
        if d.HasField("outbound_policy") or d.HasField("experimental_outbound_policy"):
            fail(
                Status.FAILED_PRECONDITION,
                "outbound policies are not enforced by the local Modal server, so they are "
                "refused rather than ignored: test them on Modal",
            )
        blocked = d.block_network or kind == api_pb2.NetworkAccess.NetworkAccessType.BLOCKED
        if blocked:
            if self.isolation is None:
                fail(
                    Status.FAILED_PRECONDITION,
                    "block_network=True needs an isolated sandbox, and this local server "
                    f"cannot isolate them ({self.not_isolated_because}): it is refused rather "
                    "than ignored",
                )
            if d.HasField("open_ports") and d.open_ports.ports:
                fail(
                    Status.INVALID_ARGUMENT, "a sandbox with block_network=True cannot serve ports"
                )
            return "none"
        # every isolated sandbox: a network of its own (`runtime.network`)
        return "own" if self.isolation is not None else "host"

    def handle_metadata(self, sb: LocalSandbox) -> api_pb2.SandboxHandleMetadata:
        res = sb.result()
        md = api_pb2.SandboxHandleMetadata(app_id=sb.spec.app_id)
        if res is not None:
            md.result.CopyFrom(res)
        return md

    def wait_response(self, sb: LocalSandbox) -> api_pb2.SandboxWaitResponse:
        resp = api_pb2.SandboxWaitResponse(metadata=self.handle_metadata(sb))
        res = sb.result()
        if res is not None:
            resp.result.CopyFrom(res)
        return resp

    def sandbox_info(self, sb: LocalSandbox) -> api_pb2.SandboxInfo:
        res = sb.result()
        task = api_pb2.TaskInfo(id=sb.task_id, sandbox_id=sb.id, started_at=sb.created_at)
        if res is not None:
            task.result.CopyFrom(res)
            task.finished_at = sb.finished_at or 0.0
        return api_pb2.SandboxInfo(
            id=sb.id,
            created_at=sb.created_at,
            task_info=task,
            app_id=sb.spec.app_id,
            tags=[api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in sb.tags.items()],
            name=sb.spec.name or "",
            timeout_secs=int(sb.spec.timeout_s),
            metadata=self.handle_metadata(sb),
        )

    def list_page(self, req: api_pb2.SandboxListRequest) -> api_pb2.SandboxListResponse:
        want_tags = {t.tag_name: t.tag_value for t in req.tags}
        found = []
        for sb in self.registry.sandboxes.values():
            if req.app_id and sb.spec.app_id != req.app_id:
                continue
            if not req.include_finished and sb.done.is_set():
                continue
            if req.before_timestamp and not sb.created_at < req.before_timestamp:
                continue
            if any(sb.tags.get(k) != v for k, v in want_tags.items()):
                continue
            found.append(sb)
        found.sort(key=lambda s: s.created_at, reverse=True)
        return api_pb2.SandboxListResponse(
            sandboxes=[self.sandbox_info(s) for s in found[:LIST_PAGE]]
        )

    def from_name(
        self, req: api_pb2.SandboxGetFromNameRequest
    ) -> api_pb2.SandboxGetFromNameResponse:
        reg = self.registry
        app_id = reg.app_get_or_create(req.app_name, req.environment_name, create=False)
        if app_id is None:
            fail(Status.NOT_FOUND, f"App {req.app_name!r} not found")
        sb = reg.running_with_name(app_id, req.sandbox_name)
        if sb is None and req.include_terminated:
            named = [
                s
                for s in reg.sandboxes.values()
                if s.spec.app_id == app_id and s.spec.name == req.sandbox_name
            ]
            sb = max(named, key=lambda s: s.created_at) if named else None
        if sb is None:
            fail(
                Status.NOT_FOUND, f"Sandbox {req.sandbox_name!r} not found in app {req.app_name!r}"
            )
        return api_pb2.SandboxGetFromNameResponse(
            sandbox_id=sb.id, metadata=self.handle_metadata(sb)
        )
