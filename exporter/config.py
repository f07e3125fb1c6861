"""Configuration: a YAML file validated by pydantic models.

Every mistake an operator can make in the file (an unknown key, a wrong type, a negative number) becomes
a ConfigError whose message names the field, so the CLI can exit 2 with a line the operator can act on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_MEMORY_BUDGET_RATIO = 0.01
DEFAULT_MICROVM_STATE_DIR = "/var/lib/microvms"
DEFAULT_FINGERPRINT_DIR = "/run/sops-nix-exporter/fingerprints"

NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreConfig(_Strict):
    """One sops-nix store: the mount point that holds the generations and the symlink to the current one."""

    mountpoint: str
    symlink: str
    keep_generations: NonNegativeInt | None = None
    memory_budget_bytes: NonNegativeInt | None = None

    @field_validator("mountpoint", "symlink")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path")
        # A trailing slash would make two spellings of one store; labels must be stable.
        return value.rstrip("/") or "/"


class MicrovmConfig(_Strict):
    state_dir: str = DEFAULT_MICROVM_STATE_DIR

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value.rstrip("/") or "/"


def default_stores() -> list[StoreConfig]:
    return [
        StoreConfig(mountpoint="/run/secrets.d", symlink="/run/secrets"),
        StoreConfig(mountpoint="/run/secrets-for-users.d", symlink="/run/secrets-for-users"),
    ]


class Config(_Strict):
    stores: list[StoreConfig] = Field(default_factory=default_stores)
    # Where `fingerprint` writes and serve/check/textfile read the content fingerprints: on /run, gone at reboot
    # like the generations they describe.
    fingerprint_dir: str = DEFAULT_FINGERPRINT_DIR
    # strict, like the integers: a quoted "0.5" or a YAML true is a mistake, not a number.
    memory_budget_ratio: Annotated[float, Field(gt=0, le=1, strict=True)] = DEFAULT_MEMORY_BUDGET_RATIO
    microvm: MicrovmConfig = Field(default_factory=MicrovmConfig)

    @field_validator("fingerprint_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value.rstrip("/") or "/"

    @field_validator("stores")
    @classmethod
    def _distinct(cls, stores: list[StoreConfig]) -> list[StoreConfig]:
        seen: set[str] = set()
        for store in stores:
            if store.mountpoint in seen:
                raise ValueError(f"mountpoint {store.mountpoint} is listed twice")
            seen.add(store.mountpoint)
        return stores

    def budget_bytes(self, store: StoreConfig, host_memory_bytes: int) -> int:
        """The store's own budget where it sets one, else the host-wide share of memory."""
        if store.memory_budget_bytes is not None:
            return store.memory_budget_bytes
        return int(host_memory_bytes * self.memory_budget_ratio)


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "(top level)"


ModelT = TypeVar("ModelT", bound=BaseModel)


def validate(model: type[ModelT], data: Any, source: str, error: type[Exception] = ConfigError) -> ModelT:
    """Validate a YAML document against model; every problem is named by its field, all in one message."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for problem in exc.errors():
            message = problem["msg"].removeprefix("Value error, ")
            if problem["type"] == "extra_forbidden":
                message = "unknown key"
            problems.append(f"{_field_path(problem['loc'])}: {message}")
        raise error(f"{source}: " + "; ".join(problems)) from None


def read_yaml(path: str | Path, what: str, error: type[Exception] = ConfigError) -> Any:
    """The parsed document of a YAML file, or error naming the file and, for bad YAML, the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: the {what} file is not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise error(f"{path}: not valid YAML{where}: {problem}") from None


def parse_config(data: Any, source: str = "configuration") -> Config:
    return validate(Config, data, source)


def load_config(path: str | Path | None) -> Config:
    """Read and validate the file; with no file, the defaults (both sops-nix stores) apply."""
    if path is None:
        return Config()
    return parse_config(read_yaml(path, "configuration"), source=str(path))
