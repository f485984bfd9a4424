"""Benchmark what files cost on the local Modal server (snapshots, local files, volumes).

Through the real modal client, median of N runs each, side by side in one run:

* sandbox create -> wait for ``true`` with the base image, with a filesystem
  snapshot holding 1,000 files / 10 MB, with the same files added by
  ``add_local_dir`` (a mount, bound read-only) and by
  ``add_local_dir(copy=True)`` (an image layer, copied into each root): what a
  bind and a layer copy add;
* ``snapshot_filesystem`` of that sandbox;
* ``Volume.batch_upload`` and ``read_file`` of one 64 MiB file, against
  ``shutil.copyfile`` of it (the disk's own speed).

Usage: ``python benchmarks/bench_local_files.py [--repeats 10]
[--out benchmarks/results/local_files.json] [--smoke]``

``--smoke`` is one repeat with 20 files of 1 kB and a 1 MiB file: it checks
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

#: The measured sizes: (files, bytes each, MiB of the one big file); --smoke's are tiny.
SIZES = (1000, 10_000, 64)
SMOKE_SIZES = (20, 1000, 1)


def _median_ms(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "local_files.json")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, one repeat: does it work?"
    )
    args = parser.parse_args()
    n_files, file_bytes, big_mib = SMOKE_SIZES if args.smoke else SIZES
    if args.smoke:
        args.repeats = 1
    isolate_modal_config()
    import modal

    from prefect_modal.local import LocalModal

    work = Path(tempfile.mkdtemp(prefix="bench-files-"))
    tree = work / "tree"
    for i in range(n_files):
        d = tree / f"d{i // 100}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.bin").write_bytes(os.urandom(file_bytes))
    big = work / "big.bin"
    big.write_bytes(os.urandom(big_mib * 1024 * 1024))
    results: dict[str, Any] = {
        "platform": platform.platform(),
        "argv": sys.argv[1:],
        "smoke": args.smoke,
        "repeats": args.repeats,
        "files": {"count": n_files, "bytes_each": file_bytes, "big_file_mib": big_mib},
    }
    try:
        with LocalModal(state_dir=work / "state") as lm:
            client = lm.client
            app = modal.App.lookup("bench-files", create_if_missing=True, client=client)

            def run(image: Any = None) -> Callable[[], None]:
                def once() -> None:
                    kw = {"image": image} if image is not None else {}
                    sb = modal.Sandbox.create("true", app=app, client=client, **kw)
                    sb.wait()

                return once

            base = modal.Image.debian_slim()
            mounted = base.add_local_dir(tree, "/opt/tree")
            copied = base.add_local_dir(tree, "/opt/tree", copy=True)
            sb = modal.Sandbox.create(app=app, client=client, image=copied)
            t0 = time.perf_counter()
            snap = sb.snapshot_filesystem()
            results["snapshot_filesystem_ms"] = (time.perf_counter() - t0) * 1000
            sb.terminate()
            for image in (base, mounted, copied, snap):  # first use: uploads, layouts
                run(image)()
            results["create_wait_ms"] = {
                "base image": _median_ms(run(base), args.repeats),
                "snapshot of the files": _median_ms(run(snap), args.repeats),
                "add_local_dir (mount)": _median_ms(run(mounted), args.repeats),
                "add_local_dir (copy=True)": _median_ms(run(copied), args.repeats),
            }

            vol = modal.Volume.from_name("bench", create_if_missing=True, client=client)
            t0 = time.perf_counter()
            with vol.batch_upload(force=True) as batch:
                batch.put_file(big, "/big.bin")
            up = time.perf_counter() - t0
            t0 = time.perf_counter()
            n = sum(len(c) for c in vol.read_file("/big.bin"))
            down = time.perf_counter() - t0
            assert n == big.stat().st_size
            t0 = time.perf_counter()
            shutil.copyfile(big, work / "copy.bin")
            cp = time.perf_counter() - t0
            results["volume_mib_s"] = {
                "batch_upload": big_mib / up,
                "read_file": big_mib / down,
                "shutil.copyfile": big_mib / cp,
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results["load_average_at_end"] = os.getloadavg()
    base_ms = results["create_wait_ms"]["base image"]
    print("| measure | value |\n|---|---|")
    for name, ms in results["create_wait_ms"].items():
        print(
            f"| create -> wait, {name} (median of {args.repeats}) | {ms:.1f} ms "
            f"({ms - base_ms:+.1f} ms) |"
        )
    print(
        f"| snapshot_filesystem, {n_files:,} files / {n_files * file_bytes / 1e6:g} MB | "
        f"{results['snapshot_filesystem_ms']:.0f} ms |"
    )
    v = results["volume_mib_s"]
    print(
        f"| {big_mib} MiB: batch_upload / read_file / shutil.copyfile | "
        f"{v['batch_upload']:.0f} / {v['read_file']:.0f} / {v['shutil.copyfile']:.0f} MiB/s |"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
