"""Integrity checks shared by checkpoints, the trainer and the pipeline.

- `tree_checksums(tree)`: a manifest of per-array sha256 checksums (dtype,
  shape and bytes), written beside our orbax checkpoints with
  `write_json_atomically` and checked after every restore by
  `verify_checksums` (orbax 0.12.8 has no checksum option for array data, and
  its zstd-compressed chunks decode a flipped byte into wrong values without
  an error).
- `check_finite(tree, source)`: NaN / inf in a loaded parameter, named.
- `check_orbax_metadata`, `orbax_error`: orbax's own failures as errors
  naming the checkpoint and file.

Every failure is a `CheckpointIntegrityError` (a `ValueError`, so the entry
points print it as one line).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np


class CheckpointIntegrityError(ValueError):
    """A checkpoint is damaged, incomplete or unverifiable; the message names the
    checkpoint and the file or array, and the fix."""


_CHECKSUMS_FORMAT = "dera-t5x array checksums 1"
# Set to 1 to load an orbax checkpoint that has no checksum manifest (written
# before dera-t5x recorded checksums), with a warning.
UNVERIFIED_ENV = "DERA_T5X_ALLOW_UNVERIFIED_CHECKPOINTS"


def key_name(path: Sequence[Any]) -> str:
    """A pytree key path as 'params/encoder/layers_0/...'."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _addressable(x: Any) -> bool:
    return getattr(x, "is_fully_addressable", True)


def _array_sha256(value: np.ndarray) -> str:
    value = np.ascontiguousarray(value)
    digest = hashlib.sha256(f"{value.dtype.str}{value.shape}".encode())
    digest.update(memoryview(value.reshape(-1).view(np.uint8)))
    return digest.hexdigest()


def tree_checksums(tree: Any) -> dict[str, Any]:
    """The manifest of a pytree: {'arrays': {name: {sha256, dtype, shape}},
    'unverified': [names]}.

    Leaves that no single process holds whole (multi-host sharded arrays) are
    listed in 'unverified': hashing them would gather them to one host.
    """
    arrays, unverified = {}, []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = key_name(path)
        if not _addressable(leaf):
            unverified.append(name)
            continue
        value = np.asarray(jax.device_get(leaf))
        arrays[name] = {"sha256": _array_sha256(value), "dtype": value.dtype.str,
                        "shape": list(value.shape)}
    return {"format": _CHECKSUMS_FORMAT, "algorithm": "sha256", "arrays": arrays,
            "unverified": unverified}


def write_json_atomically(path: str | pathlib.Path, content: Any) -> None:
    """Writes JSON to `path` through a temporary file, flushed, then renamed."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(content, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checksums(manifest: pathlib.Path, checkpoint: str | pathlib.Path
                   ) -> dict[str, Any] | None:
    """The manifest at `manifest`; None (after a warning) when it is missing and
    `DERA_T5X_ALLOW_UNVERIFIED_CHECKPOINTS=1`.

    Raises:
      CheckpointIntegrityError: missing (unless allowed) or unreadable.
    """
    if not manifest.exists():
        if os.environ.get(UNVERIFIED_ENV) == "1":
            logging.warning("%s has no checksums (%s); loaded unverified because %s=1.",
                            checkpoint, manifest.name, UNVERIFIED_ENV)
            return None
        raise CheckpointIntegrityError(
            f"{checkpoint} has no checksum manifest ({manifest}), so it cannot be verified: "
            "it was written before dera-t5x recorded checksums, or copied without it. To "
            f"load it unverified, set {UNVERIFIED_ENV}=1 (and re-save it to add checksums).")
    try:
        content = json.loads(manifest.read_text())
        if content.get("format") != _CHECKSUMS_FORMAT:
            raise ValueError(f"format {content.get('format')!r}")
        return content
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointIntegrityError(
            f"{checkpoint}: its checksum manifest {manifest} is damaged ({e}); the "
            "checkpoint cannot be verified. Restore both from a good copy.") from e


def verify_checksums(tree: Any, manifest: dict[str, Any] | None,
                     checkpoint: str | pathlib.Path) -> None:
    """Raises CheckpointIntegrityError naming the checkpoint and the first array
    whose contents differ from the manifest (or that the manifest lacks)."""
    if manifest is None:
        return
    recorded = manifest["arrays"]
    names = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = key_name(path)
        names.append(name)
        if name in manifest.get("unverified", ()) or not _addressable(leaf):
            continue
        if name not in recorded:
            raise CheckpointIntegrityError(
                f"{checkpoint}: array {name} is not in its checksum manifest; the "
                "checkpoint does not hold what was saved there.")
        if _array_sha256(np.asarray(jax.device_get(leaf))) != recorded[name]["sha256"]:
            raise CheckpointIntegrityError(
                f"{checkpoint}: array {name} does not match the checksum recorded when it "
                "was saved: the checkpoint is damaged. Restore it from a good copy, or "
                "delete it (a training run then resumes from an earlier checkpoint).")
    missing = sorted(set(recorded) - set(names))
    if missing:
        raise CheckpointIntegrityError(f"{checkpoint}: arrays {missing[:5]} were saved but "
                                       "are not in the restored tree.")


def check_finite(tree: Any, source: str | pathlib.Path) -> Any:
    """Raises CheckpointIntegrityError naming `source` and the first floating-point
    leaf holding NaN or inf; returns `tree`. Leaves no process holds whole are
    skipped."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not _addressable(leaf) or not hasattr(leaf, "dtype"):
            continue
        if jnp.issubdtype(leaf.dtype, jnp.inexact) and not np.all(
                np.isfinite(np.asarray(jax.device_get(leaf)))):
            raise CheckpointIntegrityError(
                f"{source}: parameter {key_name(path)} holds non-finite values (NaN or inf); "
                "the checkpoint is damaged or was saved from a diverged run.")
    return tree


def check_orbax_metadata(directory: pathlib.Path, checkpoint: str | pathlib.Path) -> None:
    """Every orbax `_METADATA` under `directory` must be whole JSON: a truncated
    one is named (orbax itself gives a bare JSON error)."""
    for metadata in sorted(directory.rglob("_METADATA")):
        try:
            json.loads(metadata.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointIntegrityError(
                f"{checkpoint}: {metadata} is not valid JSON ({e}); the file is truncated "
                "or damaged. Restore the checkpoint from a good copy.") from e


def orbax_error(checkpoint: str | pathlib.Path, error: Exception) -> CheckpointIntegrityError:
    """What a failed orbax read becomes: an error naming the checkpoint."""
    return CheckpointIntegrityError(
        f"{checkpoint}: orbax could not read this checkpoint ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}); it is damaged, incomplete "
        "or of another structure.")


# ------------------------------------------------------------------- settings


def canonical(value: Any) -> Any:
    """`value` as plain JSON data, for comparing and hashing settings.

    Dataclasses become {'__type__': name, field: ...}; tuples lists; numpy
    scalars and arrays numbers and lists; anything else its repr.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__type__": type(value).__name__,
                **{f.name: canonical(getattr(value, f.name))
                   for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if np.isfinite(value) else repr(value)
    if isinstance(value, np.ndarray):
        return canonical(value.tolist())
    return repr(value)


def fingerprint(settings: Any) -> str:
    """A sha256 of the canonical JSON of `settings` (16 hex digits)."""
    text = json.dumps(canonical(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten(settings: Any, prefix: str = "") -> dict[str, Any]:
    """Nested canonical settings as {'a.b.c': leaf} (lists are leaves)."""
    settings = canonical(settings)
    if not isinstance(settings, dict) or not settings:
        return {prefix: settings}
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def differences(old: Any, new: Any, ignore: Callable[[str], bool] = lambda name: False
                ) -> list[str]:
    """'name: old -> new' for each leaf setting that differs (absent: 'unset')."""
    old, new = flatten(old), flatten(new)
    lines = []
    for name in sorted(set(old) | set(new)):
        if ignore(name) or old.get(name, "unset") == new.get(name, "unset"):
            continue
        lines.append(f"{name}: {_short(old.get(name, 'unset'))} -> "
                     f"{_short(new.get(name, 'unset'))}")
    return lines


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def params_fingerprint(tree: Any) -> str:
    """A cheap identity of a parameter tree: names, shapes, dtypes and the first
    and last 16 values of every leaf (not a checksum: it tells models apart)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        digest.update(f"{key_name(path)}{getattr(leaf, 'dtype', '')}"
                      f"{tuple(np.shape(leaf))}".encode())
        if _addressable(leaf) and np.size(leaf):
            flat = jnp.ravel(leaf) if isinstance(leaf, jax.Array) else np.ravel(leaf)
            ends = np.concatenate([np.asarray(flat[:16]), np.asarray(flat[-16:])])
            digest.update(ends.astype(np.float64).tobytes())
    return digest.hexdigest()[:16]
