"""Reading the files of a Hugging Face checkpoint directory safely: only regular files (a FIFO
would block the reader, a device such as ``/dev/zero`` would be read until memory runs out), and
JSON files only up to a size no real config or index reaches."""

from __future__ import annotations

import json
import os
import stat

import jaxhybrid as jh

__all__ = ["MAX_JSON_BYTES", "check_regular_file", "read_json_object"]

# config.json of the published checkpoints is ~2 KB, a shard index ~100 KB; 16 MiB leaves room
# for any real file and bounds what a wrong one costs.
MAX_JSON_BYTES = 16 << 20


def check_regular_file(path: str) -> int:
    """Refuses what is not a regular file (checked without opening it); returns its size."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise jh.InvalidArgumentError(f"cannot read {path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise jh.InvalidArgumentError(f"{path} is not a regular file")
    return st.st_size


def read_json_object(path: str) -> dict:
    """The JSON object in the regular file ``path`` (at most :data:`MAX_JSON_BYTES`)."""
    size = check_regular_file(path)
    if size > MAX_JSON_BYTES:
        raise jh.InvalidArgumentError(
            f"{path} has {size} bytes, more than the {MAX_JSON_BYTES} a JSON config may have"
        )
    try:
        # O_NONBLOCK: a FIFO put in its place since the check must not block either.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise jh.InvalidArgumentError(f"{path} is not a regular file")
            text = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise jh.InvalidArgumentError(f"cannot read {path}: {e.strerror}") from e
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise jh.InvalidArgumentError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise jh.InvalidArgumentError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value
