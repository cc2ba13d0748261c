"""Checkpoints of a profile between batches, so that an interrupted run can continue.

A checkpoint holds only tensors, numbers and strings, and is read back with ``weights_only=True``:
nothing in it can run code. It names what it belongs to (windows, quantizers, layers, batch size),
and is refused for any other run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from kernelscope.errors import KernelscopeError

VERSION = 4


def checkpoint_path(output: str | Path) -> Path:
    """Where the checkpoint of a run writing ``output`` lives: a hidden file beside that folder."""
    out = Path(output).expanduser()
    return out.parent / f".{out.name}.checkpoint"


def save_checkpoint(path: Path, fingerprint: dict[str, Any], done: int, state: dict[str, Any]) -> None:
    """Write atomically: a crash while saving leaves the previous checkpoint intact; a place that cannot
    take it (a full disk) stops the run with one error."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
        os.close(fd)
        torch.save({"version": VERSION, "fingerprint": fingerprint, "done": done, "state": state}, tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise KernelscopeError(f"cannot write the checkpoint {path} ({exc.strerror or exc}); the run "
                                   "stopped and no result was written") from None
        raise


def is_checkpoint(path: Path) -> bool:
    """True when ``path`` is a checkpoint kernelscope wrote (so it may be replaced)."""
    try:
        body = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(body, dict) and {"version", "fingerprint", "done", "state"} <= set(body)


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Windows done and saved state, after checking the checkpoint belongs to this very run."""
    if not path.is_file():
        raise KernelscopeError(f"nothing to resume: no checkpoint at {path}")
    try:
        body = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise KernelscopeError(f"the checkpoint {path} is damaged or not kernelscope's; move it away and "
                               "rerun without --resume to start over") from None
    if not isinstance(body, dict) or body.get("version") != VERSION:
        raise KernelscopeError(f"the checkpoint {path} is from another kernelscope version; delete it")
    theirs = body.get("fingerprint") or {}
    differ = sorted(k for k in set(fingerprint) | set(theirs) if fingerprint.get(k) != theirs.get(k))
    if differ:
        changes = "; ".join(_change(k, theirs, fingerprint) for k in differ)
        raise KernelscopeError(
            f"the checkpoint {path} belongs to a different run ({changes}); "
            "rerun with the same options, or without --resume to start over"
        )
    return int(body["done"]), body["state"]


def _change(key: str, before: dict[str, Any], now: dict[str, Any]) -> str:
    """``dtype: float32 in the checkpoint, bfloat16 now``; of two lists of one length, the first item
    that differs; other long values (hashes) by name only. Numbers are shown as they compare (repr)."""
    old, new = before.get(key), now.get(key)
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        old, new = next((a, b) for a, b in zip(old, new, strict=True) if a != b)
    if all(isinstance(v, (int, float, str, list, type(None))) and len(repr(v)) <= 60 for v in (old, new)):
        return f"{key}: {_shown(old)} in the checkpoint, {_shown(new)} now"
    return f"{key} differs"


def _shown(value: Any) -> str:
    """A fingerprint value in full: every digit of a number, a list's items joined."""
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)
