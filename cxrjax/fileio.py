"""Files a run leaves behind: atomic writes, strict JSON (null for NaN), tolerant JSON lines.

Every file a run writes goes through `atomic_write` (a temporary file in the same directory,
named per process and call, flushed, fsynced and renamed over the target with `os.replace`), so
a reader, a concurrent job or a kill -9 never sees half a file, and two processes writing the
same path never share a temporary file. JSON is written with `allow_nan=False` after
`json_safe` turned non-finite numbers into `null`: a NaN metric is "missing", and the file stays
JSON that any parser reads. `read_jsonl` skips a torn line (a process killed mid-write) with a
warning instead of failing every later reader.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

import numpy as np
from absl import logging


def temp_path(path: str | os.PathLike) -> str:
    """A hidden temporary name next to `path`, unique per process and call."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Opens a temporary file for writing; on success it replaces `path` in one rename.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def read_text(path: str | os.PathLike) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def json_safe(value: Any) -> Any:
    """Plain JSON types; NaN/inf -> None, numpy scalars/arrays -> Python, tuples -> lists."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    if hasattr(value, "to_dict"):  # ConfigDict
        return json_safe(value.to_dict())
    return str(value)


def dumps(value: Any, **kwargs) -> str:
    """Strict JSON text (never bare NaN / Infinity)."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2) -> None:
    """Atomically writes strict JSON (NaN/inf as null), keys sorted."""
    write_text(path, dumps(value, indent=indent, sort_keys=True) + "\n")


def save_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """np.savez, atomically (np.savez would append ".npz" to a temporary name: use a buffer)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; unreadable lines (a torn last write) are skipped, warned."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            where = "its last line" if number >= len(lines) - 1 else f"line {number}"
            logging.warning("%s: skipping %s, which is not JSON (a torn write)", path, where)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def by_step(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per step, in step order; a replayed step (resume after kill -9) keeps its last
    row, merged over the earlier ones so no key is lost."""
    merged: dict[int, dict[str, Any]] = {}
    for row in rows:
        if "step" not in row or row["step"] is None:
            continue
        step = int(row["step"])
        merged[step] = {**merged.get(step, {}), **row}
    return [merged[step] for step in sorted(merged)]
