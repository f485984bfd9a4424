"""`SandboxSpec`: what one Modal Sandbox should look like, validated once.

The task runner (per task), the worker (per flow run, from job variables) and
the CLI all describe sandboxes with this one model, so a value that is refused
in one place is refused everywhere with the same message.  The model holds no
Modal objects: `modal_api.py` turns names (secrets, volumes, images) into Modal
objects at creation time, which keeps this module importable and testable with
no Modal client and no network.
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from prefect_modal.core import resources

#: Lifetime of a sandbox when nothing says otherwise.  Modal's own default is
#: 300 s, which kills ordinary flows half-way; an hour is what a user who did
#: not think about it most likely wants.  Set `timeout` to change it.
DEFAULT_TIMEOUT_SECONDS = 3600
DEFAULT_APP_NAME = "prefect-modal"

# Fields whose values are collections: merging a task spec over a runner spec
# combines them (env keys and volume mounts add up, secret names accumulate)
# instead of replacing them, because a task that adds one variable should not
# silently lose the runner's others.
_MERGED_DICTS = ("env", "volumes")

#: Fields whose values may be secrets: an error about them never repeats a value.
SECRET_FIELDS = frozenset({"env", "modal_credentials", "token_secret"})
_MERGED_LISTS = ("secrets", "pip_packages")


def name_the_value(
    model: type[BaseModel],
    value: Any,
    handler: ValidatorFunctionWrapHandler,
    info: ValidationInfo,
    label: str | None = None,
) -> Any:
    """Run a field's validation; a refusal names the field, the value (never a secret
    field's) and what is accepted.

    Our own rules already say all that; pydantic's type errors ("Input should
    be a valid number") say neither value nor field, and input of a wholly
    wrong shape (a list for memory) would otherwise raise a bare TypeError.
    Used as a ``mode="wrap"`` field validator by `SandboxSpec` and the work
    pool's job configuration.
    """
    field = info.field_name or "?"
    try:
        return handler(value)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        original = (first.get("ctx") or {}).get("error")
        if first["type"] == "value_error" and isinstance(original, ValueError):
            raise original from None  # one of ours: it names the value already
        reason = str(first.get("msg", "not accepted"))
    except (TypeError, AttributeError):
        reason = f"a value of type {type(value).__name__} is not accepted here"
    described = model.model_fields.get(field)
    expected = described.description if described is not None else None
    shown = "=<hidden: may hold secrets>" if field in SECRET_FIELDS else f"={value!r}"
    raise resources.ResourceError(
        f"{label or field}{shown}: {reason[:1].lower()}{reason[1:]}."
        + (f" Expected: {expected}" if expected else "")
    ) from None


def without_secret_inputs(exc: ValidationError) -> ValidationError:
    """The same errors, without the inputs of secret fields or of the whole model.

    `hide_input_in_errors` keeps inputs out of the message, but pydantic still
    hands them to whoever calls ``.errors()`` (Prefect logs those for job
    variables); an env value or a token must not travel that way either.
    """
    line_errors: list[Any] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error.get("loc", ()))
        secret = not loc or loc[0] in SECRET_FIELDS
        line: dict[str, Any] = {
            "type": error["type"],
            "loc": loc,
            "input": "<hidden>" if secret else error.get("input"),
        }
        if error.get("ctx"):
            line["ctx"] = error["ctx"]
        line_errors.append(line)
    try:
        return ValidationError.from_exception_data(exc.title, line_errors, hide_input=True)
    except Exception:  # pragma: no cover - an error type pydantic cannot rebuild
        return exc


def _blank_to_none(value: Any) -> Any:
    """Empty strings from forms and YAML mean "not set", not "empty name"."""
    if isinstance(value, str) and not value.strip():
        return None
    return value


class SandboxSpec(BaseModel):
    """Resources, image, secrets and placement of one Modal Sandbox.

    Every field is optional: an unset field inherits from the spec it is merged
    over (task over runner/pool over defaults), and finally Modal's default.
    """

    # hide_input_in_errors: pydantic would otherwise print the whole input,
    # secret env values included, in every validation error.  Our messages
    # repeat the one bad value themselves (`_name_the_value`), except for the
    # fields in `SECRET_FIELDS`.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)

    gpu: str | None = Field(
        default=None,
        description=(
            "GPU type, e.g. 'T4', 'L4', 'A10G', 'A100', 'A100-80GB', 'L40S', 'H100', "
            "'H100!', 'H200', 'B200', or 'TYPE:COUNT'. Case-insensitive. None: CPU only."
        ),
    )
    gpu_count: int | None = Field(
        default=None, description="Number of GPUs of type `gpu` (alternative to 'TYPE:COUNT')."
    )
    cpu: float | None = Field(default=None, description="CPU cores reserved (fractions allowed).")
    memory: int | None = Field(
        default=None,
        description="Memory in MiB, or a size string: '16GB' (decimal), '16GiB' / '16Gi' (binary).",
    )
    timeout: int | None = Field(
        default=None,
        description=(
            f"Sandbox lifetime in seconds, 1 to {resources.MAX_TIMEOUT_SECONDS}; "
            f"default {DEFAULT_TIMEOUT_SECONDS}."
        ),
    )
    idle_timeout: int | None = Field(
        default=None, description="Terminate the sandbox after this many idle seconds."
    )
    region: list[str] | None = Field(
        default=None, description="Region or regions to run in, e.g. 'us-east' or ['us', 'eu']."
    )
    cloud: str | None = Field(default=None, description="Cloud provider: aws, gcp, oci or auto.")
    image: str | None = Field(
        default=None,
        description=(
            "Container image reference from a registry, e.g. 'python:3.11-slim'. "
            "Default: Modal's debian_slim with this Python's version and cloudpickle."
        ),
    )
    registry_secret: str | None = Field(
        default=None,
        description=(
            "Name of a Modal secret holding REGISTRY_USERNAME / REGISTRY_PASSWORD "
            "for a private `image`."
        ),
    )
    python_version: str | None = Field(
        default=None,
        description="Python version of the default image; defaults to the local one, e.g. '3.11'.",
    )
    pip_packages: list[str] | None = Field(
        default=None, description="Extra pip packages installed into the image."
    )
    local_python_sources: list[str] | None = Field(
        default=None,
        description=(
            "Python packages of this machine added to the default image with "
            "Image.add_local_python_source (e.g. 'my_project'): code that is not on PyPI."
        ),
    )
    auto_packages: bool | None = Field(
        default=None,
        description=(
            "Per-step tasks: add to the default image the flow environment's installed "
            "versions of the packages a call refers to (e.g. prefect for get_run_logger); "
            "default True. Packages named in pip_packages keep your version."
        ),
    )
    secrets: list[str] | None = Field(
        default=None, description="Names of Modal secrets to inject as environment variables."
    )
    env: dict[str, str | SecretStr] | None = Field(
        default=None,
        description=(
            "Environment variables. Secret-looking names (PREFECT_API_KEY, *_TOKEN, *_KEY, "
            "*_SECRET, *_PASSWORD) are sent as a modal.Secret, never as plain env."
        ),
    )
    app_name: str | None = Field(
        default=None,
        description=f"Modal app the sandboxes belong to; default '{DEFAULT_APP_NAME}'.",
    )
    modal_environment: str | None = Field(
        default=None, description="Modal environment; default: the credentials' or Modal's default."
    )
    volumes: dict[str, str] | None = Field(
        default=None,
        description="Mount path in the sandbox -> Modal volume name (created if missing).",
    )
    workdir: str | None = Field(default=None, description="Working directory inside the sandbox.")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise without_secret_inputs(exc) from None

    # -- validation: one rule per field, messages from resources.py -------------

    @field_validator(
        "gpu",
        "image",
        "registry_secret",
        "python_version",
        "app_name",
        "modal_environment",
        "cloud",
        "workdir",
        mode="before",
    )
    @classmethod
    def _blank_strings(cls, value: Any) -> Any:
        return _blank_to_none(value)

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> int | None:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        return resources.memory_mib(value, field="memory")

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, value: float | None) -> float | None:
        return resources.check_cpu(value, field="cpu")

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: int | None) -> int | None:
        return resources.check_timeout(value, field="timeout")

    @field_validator("idle_timeout")
    @classmethod
    def _idle_timeout(cls, value: int | None) -> int | None:
        return resources.check_timeout(value, field="idle_timeout")

    @field_validator("gpu_count")
    @classmethod
    def _gpu_count(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise resources.ResourceError(f"gpu_count={value!r} is negative; use 0 or more.")
        return value

    @field_validator("region", mode="before")
    @classmethod
    def _region(cls, value: Any) -> list[str] | None:
        return resources.check_regions(value, field="region")

    @field_validator("cloud")
    @classmethod
    def _cloud(cls, value: str | None) -> str | None:
        return resources.check_cloud(value, field="cloud")

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str | None) -> str | None:
        return resources.check_absolute_path(value, field="workdir")

    @field_validator("python_version")
    @classmethod
    def _python_version(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = value.split(".")
        if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts) or parts[0] != "3":
            raise resources.ResourceError(
                f"python_version={value!r} is not a Python 3 version; use e.g. '3.11' or '3.12.4'."
            )
        return value

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if not value:
            return value or None
        checked: dict[str, str] = {}
        for path, name in value.items():
            mount = resources.check_absolute_path(path, field=f"volumes[{path!r}]")
            if mount is None or not name or not name.strip():
                raise resources.ResourceError(
                    f"volumes[{path!r}]={name!r}: map an absolute mount path to a volume name, "
                    "e.g. {'/data': 'my-volume'}."
                )
            checked[mount] = name.strip()
        return checked

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, value: Any) -> Any:
        """Wrap secret-named values in SecretStr so no repr can show them."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise resources.ResourceError(
                "env must be a mapping of variable names to string values, e.g. {'MODE': 'fast'}."
            )
        wrapped: dict[str, SecretStr | str] = {}
        for name, raw in value.items():
            if not isinstance(name, str) or not name or "=" in name or "\x00" in name:
                raise resources.ResourceError(
                    f"env: {name!r} is not a valid environment variable name."
                )
            if raw is None:
                continue
            if not isinstance(raw, str | SecretStr | int | float | bool):
                raise resources.ResourceError(
                    f"env[{name!r}] must be a string (got {type(raw).__name__})."
                )
            text = raw if isinstance(raw, SecretStr) else str(raw)
            if resources.is_secret_env_name(name) and not isinstance(text, SecretStr):
                text = SecretStr(text)
            wrapped[name] = text
        return wrapped

    @field_validator("secrets", "pip_packages", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        names = [v.strip() for v in value if isinstance(v, str) and v.strip()]
        return names or None

    # Defined last, so it runs first and wraps every other validator of the field.
    @field_validator("*", mode="wrap")
    @classmethod
    def _name_the_value(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        return name_the_value(cls, value, handler, info)

    @model_validator(mode="after")
    def _gpu_combination(self) -> SandboxSpec:
        # Checked on the whole model because the error lies in the pair.
        resources.gpu_string(self.gpu, self.gpu_count)
        if self.registry_secret and not self.image:
            raise resources.ResourceError(
                f"registry_secret={self.registry_secret!r} is set but image is not; "
                "a registry secret only applies to an `image` pulled from a registry."
            )
        return self

    # -- combining specs ---------------------------------------------------------

    def merged_with(self, override: SandboxSpec | None) -> SandboxSpec:
        """Return this spec with every field `override` set explicitly laid on top.

        Only fields the override's author set count (pydantic's
        `model_fields_set`), so a task that asks for a GPU keeps the runner's
        memory.  Mappings (env, volumes) merge key by key and lists (secrets,
        pip_packages) accumulate, the later spec winning on conflicts.
        """
        if override is None:
            return self
        data: dict[str, Any] = {name: getattr(self, name) for name in self.model_fields_set}
        for name in override.model_fields_set:
            new = getattr(override, name)
            old = data.get(name)
            if name in _MERGED_DICTS and old and new:
                new = {**old, **new}
            elif name in _MERGED_LISTS and old and new:
                new = list(dict.fromkeys([*old, *new]))
            data[name] = new
        if "gpu" in override.model_fields_set and "gpu_count" not in override.model_fields_set:
            # A task that names its own GPU decides its own count too.
            data.pop("gpu_count", None)
        return SandboxSpec(**data)

    # -- what Modal receives -------------------------------------------------------

    @property
    def gpu_config(self) -> str | None:
        """The single GPU string Modal takes, e.g. 'A100:2', or None for CPU only."""
        return resources.gpu_string(self.gpu, self.gpu_count)

    @property
    def effective_app_name(self) -> str:
        return self.app_name or DEFAULT_APP_NAME

    @property
    def effective_python_version(self) -> str:
        return self.python_version or f"{sys.version_info.major}.{sys.version_info.minor}"

    def plain_env(self) -> dict[str, str]:
        """Variables safe to show: they go to the sandbox as plain env."""
        return {k: v for k, v in (self.env or {}).items() if isinstance(v, str)}

    def secret_env(self) -> dict[str, str]:
        """Variables that travel as a modal.Secret.  Call only at creation time."""
        return {
            k: v.get_secret_value() for k, v in (self.env or {}).items() if isinstance(v, SecretStr)
        }

    def sandbox_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `modal.Sandbox.create`, Modal objects still as names.

        `secrets` holds secret *names* and `volumes` volume *names*; the sandbox
        layer resolves them to `modal.Secret` / `modal.Volume` objects (and adds
        `secret_env()` as one more secret) because only it may import modal.
        """
        kwargs: dict[str, Any] = {
            "timeout": self.timeout or DEFAULT_TIMEOUT_SECONDS,
            "env": self.plain_env() or None,
            "secrets": list(self.secrets or []),
            "volumes": dict(self.volumes or {}),
        }
        optional = {
            "gpu": self.gpu_config,
            "cpu": self.cpu,
            "memory": self.memory,
            "idle_timeout": self.idle_timeout,
            "region": (self.region[0] if self.region and len(self.region) == 1 else self.region),
            "cloud": self.cloud,
            "workdir": self.workdir,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        return kwargs

    def describe(self) -> dict[str, Any]:
        """A JSON-safe summary for artifacts, logs and tables: never a secret value."""
        summary: dict[str, Any] = {
            "gpu": self.gpu_config,
            "cpu": self.cpu,
            "memory_mib": self.memory,
            "timeout": self.timeout or DEFAULT_TIMEOUT_SECONDS,
            "region": self.region,
            "cloud": self.cloud,
            "image": self.image or f"debian_slim(python={self.effective_python_version})",
            "pip_packages": self.pip_packages,
            "secrets": self.secrets,
            "env_names": sorted((self.env or {}).keys()) or None,
            "volumes": self.volumes,
            "workdir": self.workdir,
            "app_name": self.effective_app_name,
            "modal_environment": self.modal_environment,
        }
        return {k: v for k, v in summary.items() if v is not None}
