"""Benchmark images on the local Modal server: what a built image costs a sandbox, and builds.

Through the real modal client, side by side in one run:

* sandbox create -> wait for ``true``, median of N: with no image (the
  server's base view), with ``debian_slim()`` and with
  ``debian_slim().pip_install("six==1.16.0")`` once built (a new
  ``modal.Image`` object each time, as a new flow process has: the
  ``ImageGetOrCreate`` round trip and the cache lookup are in the time), and
  with that image's hydrated object (no image RPC at all);
* the first build of a one-package pip layer (``six==1.16.0``) on a built
  base, from a warm uv cache, median of N fresh image caches;
* ``--cold``: first builds with an empty uv cache and an empty image cache
  (temporary directories through ``UV_CACHE_DIR`` / ``LocalModal(image_cache=)``;
  the machine's own caches are never touched) of the per-step runner's default
  image, and of the worker's default images in pipeline and ``per_step``
  mode; then the same builds again with the uv cache warm.

Usage: ``python benchmarks/bench_images.py [--repeats 10] [--cold]
[--out benchmarks/results/images.json] [--smoke]``

``--smoke`` is one repeat of each measure (``--cold``'s builds, which fetch
every wheel of the worker's images again, only if asked for too): it checks
that the benchmark works, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_common import RESULTS, isolate_modal_config

PACKAGE = "six==1.16.0"


def _median_ms(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _default_images() -> dict[str, Any]:
    """The images prefect-modal asks for by default, by who asks."""
    from prefect_modal.core import modal_api
    from prefect_modal.core.spec import SandboxSpec
    from prefect_modal.worker.worker import ModalWorkerJobConfiguration

    return {
        "per-step runner default (cloudpickle)": modal_api.build_image(SandboxSpec()),
        "worker pipeline default (prefect pinned)": modal_api.build_image(
            ModalWorkerJobConfiguration().sandbox_spec()
        ),
        "worker per_step default (prefect + prefect-modal)": modal_api.build_image(
            ModalWorkerJobConfiguration(mode="per_step").sandbox_spec()
        ),
    }


def _cold_builds(work: Path) -> dict[str, dict[str, float]]:
    """Seconds to build each default image with empty caches (a uv cache of its own),
    then again into an empty image cache with that uv cache warm."""
    import modal

    from prefect_modal.local import LocalModal

    out: dict[str, dict[str, float]] = {}
    previous = os.environ.get("UV_CACHE_DIR")
    try:
        for i, name in enumerate(_default_images()):
            os.environ["UV_CACHE_DIR"] = str(work / f"uv-{i}")  # read by the builder's uv
            for phase in ("empty uv cache", "warm uv cache"):
                cache = work / f"images-{i}-{phase.split()[0]}"
                with LocalModal(state_dir=work / "state-cold", image_cache=cache) as lm:
                    app = modal.App.lookup("bench-cold", create_if_missing=True, client=lm.client)
                    image = _default_images()[name]  # a new object for this server
                    t0 = time.perf_counter()
                    image.build(app)
                    out.setdefault(name, {})[phase] = time.perf_counter() - t0
                    builds = lm.image_builds["builds"]
                print(f"  {name}, {phase}: {out[name][phase]:.1f} s, {builds} layers", flush=True)
    finally:
        if previous is None:
            os.environ.pop("UV_CACHE_DIR", None)
        else:
            os.environ["UV_CACHE_DIR"] = previous
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cold", action="store_true", help="also time first builds, caches empty")
    parser.add_argument("--out", type=Path, default=RESULTS / "images.json")
    parser.add_argument(
        "--smoke", action="store_true", help="one repeat of each measure: does it work?"
    )
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    isolate_modal_config()
    import modal

    from prefect_modal.local import LocalModal

    work = Path(tempfile.mkdtemp(prefix="bench-images-"))
    results: dict[str, Any] = {
        "platform": platform.platform(),
        "argv": sys.argv[1:],
        "smoke": args.smoke,
        "repeats": args.repeats,
    }
    try:
        with LocalModal(state_dir=work / "state", image_cache=work / "images") as lm:
            client = lm.client
            if lm.isolation is None:
                print(f"sandboxes are not isolated here: {lm.not_isolated_because}")
                return 1
            app = modal.App.lookup("bench-images", create_if_missing=True, client=client)

            def run(make: Callable[[], Any] | None) -> Callable[[], None]:
                def once() -> None:
                    kw = {"image": make()} if make is not None else {}
                    sb = modal.Sandbox.create("true", app=app, client=client, **kw)
                    sb.wait()

                return once

            hydrated = modal.Image.debian_slim().pip_install(PACKAGE)
            for make in (
                None,
                modal.Image.debian_slim,
                lambda: modal.Image.debian_slim().pip_install(PACKAGE),
                lambda: hydrated,
            ):
                run(make)()  # first use: builds, the warm fork server of the environment
            results["create_wait_ms"] = {
                "no image (base)": _median_ms(run(None), args.repeats),
                "debian_slim(), built": _median_ms(run(modal.Image.debian_slim), args.repeats),
                f"+ pip_install({PACKAGE!r}), built": _median_ms(
                    run(lambda: modal.Image.debian_slim().pip_install(PACKAGE)), args.repeats
                ),
                "same, hydrated Image object": _median_ms(run(lambda: hydrated), args.repeats),
            }

        # the first build of a one-package layer: the uv cache is warm (above), each
        # image cache is new, so its base layer is built first (timed apart)
        base_s, layer_s = [], []
        for i in range(args.repeats):
            with LocalModal(state_dir=work / f"state-{i}", image_cache=work / f"fresh-{i}") as lm:
                app = modal.App.lookup("bench-layer", create_if_missing=True, client=lm.client)
                t0 = time.perf_counter()
                modal.Image.debian_slim().build(app)
                base_s.append(time.perf_counter() - t0)
                before = lm.image_builds["builds"]
                t0 = time.perf_counter()
                modal.Image.debian_slim().pip_install(PACKAGE).build(app)
                layer_s.append(time.perf_counter() - t0)
                assert lm.image_builds["builds"] == before + 1, lm.image_builds  # one layer
            shutil.rmtree(work / f"fresh-{i}", ignore_errors=True)
        results["first_build_s"] = {
            "debian_slim() (uv venv --seed + the modal client's requirements)": statistics.median(
                base_s
            ),
            f"pip_install({PACKAGE!r}) layer, warm uv cache": statistics.median(layer_s),
        }
        if args.cold:
            results["default_image_build_s"] = _cold_builds(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results["load_average_at_end"] = os.getloadavg()
    base_ms = results["create_wait_ms"]["no image (base)"]
    print("| measure | value |\n|---|---|")
    for name, ms in results["create_wait_ms"].items():
        print(
            f"| create -> wait, {name} (median of {args.repeats}) | {ms:.1f} ms "
            f"({ms - base_ms:+.1f} ms) |"
        )
    for name, s in results["first_build_s"].items():
        print(f"| first build, {name} (median of {args.repeats}) | {s:.2f} s |")
    for name, phases in results.get("default_image_build_s", {}).items():
        text = " / ".join(f"{s:.1f} s" for s in phases.values())
        print(f"| first build of the {name}: empty / warm uv cache | {text} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
