"""Every rule and every error message about sandbox resources, in one place.

The task runner, the worker and the CLI all read user input (Python arguments,
job variables, environment variables) into the same few resource fields.  Keeping
the rules here means a user gets the same answer, worded the same way, wherever
they typed the value.  Messages name the field, repeat the bad value and say
what is accepted, because the reader is usually looking at a failed deployment,
not at this code.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping

from prefect_modal.core.errors import PrefectModalError

#: GPU types Modal accepts, in the spelling Modal documents.  Matching is
#: case-insensitive; the output is always this spelling.  "H100!" pins an H100
#: (Modal may otherwise upgrade an H100 request to an H200).
KNOWN_GPU_TYPES: tuple[str, ...] = (
    "T4",
    "L4",
    "A10G",
    "A100",
    "A100-40GB",
    "A100-80GB",
    "L40S",
    "H100",
    "H100!",
    "H200",
    "B200",
    "ANY",
)
_GPU_ALIASES = {"A10": "A10G"}
_GPU_BY_KEY = {g.upper(): g for g in KNOWN_GPU_TYPES} | _GPU_ALIASES

#: Modal's hard cap on a sandbox's lifetime (24 h).
MAX_TIMEOUT_SECONDS = 86_400

#: Clouds Modal schedules on; "auto" lets Modal choose.
KNOWN_CLOUDS: tuple[str, ...] = ("aws", "gcp", "oci", "auto")

MIB = 1024 * 1024
# SI units are decimal, IEC units binary: "16GB" is 16e9 bytes, "16GiB" 16 * 2**30.
_MEMORY_UNITS: dict[str, int] = {
    "": MIB,  # a bare number is MiB, as Modal's `memory=` takes it
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
    "T": 1000**4,
    "TB": 1000**4,
    "KI": 1024,
    "KIB": 1024,
    "MI": 1024**2,
    "MIB": 1024**2,
    "GI": 1024**3,
    "GIB": 1024**3,
    "TI": 1024**4,
    "TIB": 1024**4,
}
_MEMORY_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[A-Za-z]*)\s*$")
MEMORY_FORMS = (
    "a whole number of MiB (e.g. 2048), or a number with a unit: "
    "SI (decimal) KB, MB, GB, TB or IEC (binary) KiB, MiB, GiB, TiB / Ki, Mi, Gi, Ti "
    "(e.g. '16GB' = 16e9 bytes = 15259 MiB, '16GiB' = 16384 MiB)"
)


class ResourceError(PrefectModalError, ValueError):
    """A resource value a sandbox cannot be created with.

    A ValueError so that pydantic validators turn it into a ValidationError that
    keeps our message, and so plain callers can catch it without importing us.
    """


def _known_gpus() -> str:
    return ", ".join(KNOWN_GPU_TYPES)


def canonical_gpu_type(value: str, field: str = "gpu") -> str:
    """Return Modal's spelling of a GPU type, whatever case the user typed."""
    key = value.strip().upper()
    if key not in _GPU_BY_KEY:
        raise ResourceError(
            f"{field}={value!r} is not a GPU type Modal offers. "
            f"Known types (case-insensitive): {_known_gpus()}; "
            f"append ':COUNT' or set gpu_count for several, e.g. 'A100:2'."
        )
    return _GPU_BY_KEY[key]


def gpu_string(gpu: str | None, gpu_count: int | None = None) -> str | None:
    """Combine a GPU type and a count into the one string Modal takes.

    "A100" + 2 -> "A100:2"; "A100" alone -> "A100"; "a100:2" -> "A100:2".
    Returns None for CPU only.  A count without a type is an error (which GPU
    would we ask for?), a type with count 0 is taken as "no GPU" with a warning,
    and a count in the string that disagrees with gpu_count is an error.
    """
    if gpu is not None and not gpu.strip():
        gpu = None
    if gpu_count is not None and gpu_count < 0:
        raise ResourceError(f"gpu_count={gpu_count!r} is negative; use 0 or more.")
    if gpu is None:
        if gpu_count:
            raise ResourceError(
                f"gpu_count={gpu_count!r} is set but gpu is not: name the GPU type too, "
                f"e.g. gpu='A100', gpu_count={gpu_count} (known types: {_known_gpus()})."
            )
        return None
    type_part, sep, count_part = gpu.strip().partition(":")
    gpu_type = canonical_gpu_type(type_part, field="gpu")
    count: int | None = None
    if sep:
        if not count_part.strip().isdigit():
            raise ResourceError(
                f"gpu={gpu!r}: the count after ':' must be a whole number, e.g. 'A100:2'."
            )
        count = int(count_part)
        if gpu_count is not None and gpu_count != count:
            raise ResourceError(
                f"gpu={gpu!r} asks for {count} GPU(s) but gpu_count={gpu_count!r}; "
                f"give the count in one place only."
            )
    elif gpu_count is not None:
        count = gpu_count
    if count == 0:
        warnings.warn(
            f"gpu={gpu!r} with a count of 0 asks for no GPU; the sandbox runs on CPU only.",
            UserWarning,
            stacklevel=2,
        )
        return None
    if count is None or count == 1:
        return gpu_type
    return f"{gpu_type}:{count}"


def memory_mib(value: int | float | str | None, field: str = "memory") -> int | None:
    """Read a memory size and return whole MiB, rounded up.

    Rounding up, because a sandbox given less than asked for is killed by the
    OOM killer at the worst moment, while one MiB more costs nothing.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ResourceError(f"{field}={value!r} is not a size; expected {MEMORY_FORMS}.")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value <= 0:
            raise ResourceError(
                f"{field}={value!r} must be more than 0 MiB; expected {MEMORY_FORMS}."
            )
        return math.ceil(value)
    text = value.strip()
    if not text:
        return None
    match = _MEMORY_RE.match(text)
    unit = match.group("unit").upper() if match else None
    if match is None or unit not in _MEMORY_UNITS:
        raise ResourceError(
            f"{field}={value!r} is not a size we can read; expected {MEMORY_FORMS}."
        )
    number = float(match.group("num"))
    size_bytes = number * _MEMORY_UNITS[unit]
    if size_bytes <= 0:
        raise ResourceError(f"{field}={value!r} must be more than 0; expected {MEMORY_FORMS}.")
    return math.ceil(size_bytes / MIB)


def check_cpu(value: float | None, field: str = "cpu") -> float | None:
    """CPU cores must be a positive number (fractions allowed, as on Modal)."""
    if value is None:
        return None
    if isinstance(value, bool) or not math.isfinite(float(value)) or float(value) <= 0:
        raise ResourceError(
            f"{field}={value!r} must be a number of CPU cores above 0, e.g. 0.5, 2 or 8."
        )
    return float(value)


def check_timeout(value: int | None, field: str = "timeout") -> int | None:
    """A sandbox lifetime in whole seconds, 1 to Modal's 24 h cap."""
    if value is None:
        return None
    if isinstance(value, bool) or value < 1 or value > MAX_TIMEOUT_SECONDS:
        raise ResourceError(
            f"{field}={value!r} seconds is out of range; Modal accepts 1 to "
            f"{MAX_TIMEOUT_SECONDS} (24 h)."
        )
    return int(value)


def check_cloud(value: str | None, field: str = "cloud") -> str | None:
    """Normalise a cloud provider name; Modal schedules on these only."""
    if value is None or not value.strip():
        return None
    cloud = value.strip().lower()
    if cloud not in KNOWN_CLOUDS:
        raise ResourceError(
            f"{field}={value!r} is not a cloud Modal schedules on; use one of "
            f"{', '.join(KNOWN_CLOUDS)}."
        )
    return cloud


def check_regions(value: str | Iterable[str] | None, field: str = "region") -> list[str] | None:
    """One region or several ("us-east", "us-east,eu-west", ["us", "eu"])."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    if any(not isinstance(r, str) for r in items):
        raise ResourceError(f"{field}={value!r}: every region must be a string, e.g. 'us-east'.")
    regions = [r.strip() for r in items if r.strip()]
    if any(not re.fullmatch(r"[A-Za-z0-9-]+", r) for r in regions):
        raise ResourceError(
            f"{field}={value!r}: a region is letters, digits and '-' (e.g. 'us-east', 'eu')."
        )
    return regions or None


def check_absolute_path(value: str | None, field: str) -> str | None:
    """Container paths (workdir, volume mounts) must be absolute, as on Modal."""
    if value is None or not value.strip():
        return None
    path = value.strip()
    if not path.startswith("/"):
        raise ResourceError(
            f"{field}={value!r} must be an absolute path inside the sandbox, e.g. '/data'."
        )
    return path


# Names that mark an environment variable as a secret.  Exact names first, then
# patterns: suffixes cover FOO_TOKEN / DB_PASSWORD / AWS_SECRET_ACCESS_KEY-style
# names; "SECRET" or "PASSWORD" anywhere is never a plain setting.
_SECRET_NAMES = frozenset({"PREFECT_API_KEY", "MODAL_TOKEN_SECRET", "MODAL_TOKEN_ID"})
_SECRET_SUFFIXES = ("_SECRET", "_TOKEN", "_PASSWORD", "_KEY", "_APIKEY", "_PASSWD", "_PWD")
_SECRET_PARTS = ("SECRET", "PASSWORD")


def is_secret_env_name(name: str) -> bool:
    """True for variable names whose values must travel as a modal.Secret."""
    upper = name.upper()
    return (
        upper in _SECRET_NAMES
        or upper.endswith(_SECRET_SUFFIXES)
        or any(part in upper for part in _SECRET_PARTS)
    )


def split_secret_env(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Split env into (plain, secret) by name.

    The sandbox layer sends the secret half as a modal.Secret, which Modal
    stores encrypted and never shows; the plain half is visible in Modal's UI
    and in our local server's listing.
    """
    plain: dict[str, str] = {}
    secret: dict[str, str] = {}
    for name, value in env.items():
        (secret if is_secret_env_name(name) else plain)[name] = value
    return plain, secret
