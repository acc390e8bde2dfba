"""Stores on object storage: any fsspec URL (`s3://bucket/prefix/store.zarr`, `gs://...`, `az://...`).

How a remote store is reached, the way fsspec/s3fs users expect (later wins):

1. what the filesystem finds itself: for S3, s3fs/botocore read `AWS_ACCESS_KEY_ID`,
   `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`, `AWS_ENDPOINT_URL`,
   `AWS_DEFAULT_REGION` and `~/.aws/`; fsspec adds its own config files and `FSSPEC_S3_*` variables;
2. the experiment YAML's `storage` section (`storage.options`: fsspec storage options such as
   `endpoint_url` or `client_kwargs`; `--set storage.options.endpoint_url=...` works too);
3. `--storage-option key=value` on the command line (repeatable; `client_kwargs.region_name=x`
   nests; values are read as YAML scalars, so `anon=true` is a boolean).

Credentials are never written into a file this project writes: the `storage` section is left out
of RUN_DIR/config.yaml and of every side file, and error messages name the URL, never an option
value. Child processes (build-cache workers, DataLoader workers, `cv --devices` folds) get the
options through the environment variable CTPREP_STORAGE_OPTIONS, as they get `AWS_*`.

Every failure to reach a store becomes one line naming the URL (`describe`): access denied (bad
credentials), a missing bucket, an unreachable endpoint, a missing filesystem package.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ENV = "CTPREP_STORAGE_OPTIONS"
Target = str | Path   # a local path or an fsspec URL


def _inherited_sessions_are_not_leaks(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Unclosed client session")


def _after_fork_in_child() -> None:
    """A forked process (a DataLoader worker) inherits the parent's cached s3fs clients, whose HTTP
    sessions belong to the parent's event loop and sockets: they cannot be closed here, and fsspec
    drops them in the child, so aiohttp would log "Unclosed client session" for each, every epoch.
    That message is not a leak in a forked child, so the child does not print it."""
    logging.getLogger("asyncio").addFilter(_inherited_sessions_are_not_leaks)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass
class StorageConfig:
    """The experiment YAML's `storage` section (how to reach a remote store; never saved in a run)."""

    options: dict[str, Any] = field(default_factory=dict)  # fsspec storage options (endpoint_url, ...)
    read_ahead: int = 8    # volumes one loader process fetches concurrently from a remote store


def is_remote(path: Target) -> bool:
    """True for an fsspec URL (`s3://...`); a plain path is a local store."""
    return "://" in str(path)


def parse_options(items: Iterable[str]) -> dict[str, Any]:
    """`["endpoint_url=http://h:9000", "client_kwargs.region_name=eu"]` -> a nested options dict."""
    import yaml

    from ctprep.config import ConfigError

    out: dict[str, Any] = {}
    for text in items:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--storage-option '{text.split('=', 1)[0]}...' must look like key=value "
                              "(e.g. endpoint_url=http://127.0.0.1:9000)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)):
            value = raw  # only scalars: a secret that looks like YAML stays the string it is
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--storage-option {key.strip()}: '{part}' is set to a value and a mapping")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_storage(config: Target | None = None, overrides: Sequence[str] = (),
                 cli_options: Sequence[str] = ()) -> StorageConfig:
    """The storage settings of one command: inherited from the parent process (a `cv --devices`
    fold, a worker) < YAML `storage` < `--set storage.*` < `--storage-option`."""
    from ctprep.config import ConfigError, apply_overrides, build, read_yaml

    raw = read_yaml(config) if config is not None else {}
    raw = apply_overrides(raw, [o for o in overrides if o.split(".", 1)[0] == "storage"])
    section = raw.get("storage") or {}
    try:
        given = build(StorageConfig, section, "storage")
    except ConfigError as exc:
        raise ConfigError(f"{config}: {exc}" if config is not None else str(exc)) from None
    if given.read_ahead < 1:
        raise ConfigError(f"storage.read_ahead must be >= 1, got {given.read_ahead}")
    base = current()
    options = _merge(_merge(base.options, given.options), parse_options(cli_options))
    return StorageConfig(options=options, read_ahead=given.read_ahead if "read_ahead" in section else base.read_ahead)


def configure(cfg: StorageConfig) -> None:
    """Make `cfg` this process's storage settings, inherited by the processes it starts."""
    os.environ[ENV] = json.dumps(asdict(cfg), sort_keys=True)


def current() -> StorageConfig:
    """This process's storage settings (defaults when none were configured)."""
    text = os.environ.get(ENV)
    if not text:
        return StorageConfig()
    try:
        data = json.loads(text)
        return StorageConfig(options=dict(data.get("options") or {}), read_ahead=int(data.get("read_ahead", 8)))
    except (ValueError, TypeError, AttributeError):
        from ctprep.config import ConfigError

        raise ConfigError(f"environment variable {ENV} is not the JSON ctprep writes; unset it") from None


def storage_options() -> dict[str, Any]:
    return dict(current().options)


def filesystem(url: str) -> tuple[Any, str]:
    """(synchronous fsspec filesystem, path inside it) for `url`, with this process's options.

    fsspec caches filesystem instances by their options, so this is cheap to call often."""
    import fsspec

    try:
        return fsspec.url_to_fs(url, **storage_options())
    except Exception as exc:  # noqa: BLE001 - unknown protocol, missing package, bad option
        raise store_error(url, exc) from None


def bucket_of(url: str) -> str:
    """`s3://bucket/a/b` -> `bucket`."""
    return str(url).split("://", 1)[1].split("/", 1)[0]


def describe(url: Target, exc: BaseException) -> str:
    """One line naming `url` and what went wrong reaching it (never an option's value)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    name = type(exc).__name__
    creds = ("check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or "
             "--storage-option key=... secret=...) and the endpoint (AWS_ENDPOINT_URL or "
             "--storage-option endpoint_url=...)")
    lowered = text.lower()
    if isinstance(exc, PermissionError) or any(w in lowered for w in (
            "access denied", "accessdenied", "forbidden", "invalidaccesskeyid", "signaturedoesnotmatch",
            "access key id you provided does not exist", "security token", "unable to locate credentials")):
        return f"{url}: access denied ({text}); {creds}"
    if "bucket does not exist" in lowered or "nosuchbucket" in lowered:
        return (f"{url}: bucket '{bucket_of(str(url))}' does not exist (create it first, or check the "
                "endpoint: AWS_ENDPOINT_URL or --storage-option endpoint_url=...)")
    if isinstance(exc, ImportError) or "install s3fs" in lowered:
        return f"{url}: {text}; install the extra: pip install 'ctprep-cttrain[s3]'"
    if "could not connect" in lowered or "connect call failed" in lowered or "cannot connect" in lowered \
            or name in ("EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError"):
        return f"{url}: cannot reach the storage endpoint ({text}); check AWS_ENDPOINT_URL or " \
               "--storage-option endpoint_url=..."
    if "protocol not known" in lowered or "unknown protocol" in lowered:
        return f"{url}: unknown URL protocol ({text})"
    return f"{url}: {name}: {text}"


def store_error(url: Target, exc: BaseException) -> Exception:
    """A StoreError (one line, naming `url`) for an exception met while reaching a remote store."""
    from ctprep.store import StoreError

    return StoreError(describe(url, exc))


def join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *[p.strip("/") for p in parts]])


# ------------------------------------------------------------------------- side-file input/output


def write_text(target: Target, text: str) -> None:
    """Write a small text file atomically: locally a temporary file and `os.replace`; remotely one
    PUT (an object store never shows a half-written object)."""
    if not is_remote(target):
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return
    fs, path = filesystem(str(target))
    try:
        fs.pipe_file(path, text.encode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - one line naming the file
        raise store_error(target, exc) from None


def read_text(target: Target) -> str:
    if not is_remote(target):
        return Path(target).read_text(encoding="utf-8")
    fs, path = filesystem(str(target))
    try:
        return fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise store_error(target, exc) from None


def exists(target: Target) -> bool:
    if not is_remote(target):
        return Path(target).is_file()
    fs, path = filesystem(str(target))
    try:
        fs.invalidate_cache()
        return bool(fs.exists(path))
    except Exception as exc:  # noqa: BLE001
        raise store_error(target, exc) from None


def glob(pattern: Target) -> list[Target]:
    """Files matching a glob pattern (a local path or a URL); URLs keep their protocol."""
    if not is_remote(pattern):
        p = Path(pattern)
        return sorted(p.parent.glob(p.name))
    fs, path = filesystem(str(pattern))
    try:
        fs.invalidate_cache()
        found = fs.glob(path)
    except Exception as exc:  # noqa: BLE001
        raise store_error(pattern, exc) from None
    protocol = str(pattern).split("://", 1)[0]
    return sorted(f"{protocol}://{p}" for p in found)
