"""Run folders are written all-or-nothing and read back with checks."""

from __future__ import annotations

import json
import os

import polars as pl
import pytest

from kernelscope.errors import KernelscopeError
from kernelscope.results import SCHEMA_VERSION, read_run, write_run

FRAME = pl.DataFrame({"layer": ["a", "b"], "kernel_fraction": [0.1, 0.2]})


def test_write_and_read_back(tmp_path):
    out = write_run(tmp_path / "run", {"layers": FRAME}, {"kind": "profile", "x": float("nan")})
    run = read_run(out)
    assert run.summary["schema_version"] == SCHEMA_VERSION and run.summary["x"] is None
    assert run.tables["layers"].equals(FRAME)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary left
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask  # an ordinary folder, not owner-only


def test_existing_folder_refused_unless_overwrite(tmp_path):
    write_run(tmp_path / "run", {"layers": FRAME}, {"kind": "profile"})
    with pytest.raises(KernelscopeError, match="already exists; pass --overwrite"):
        write_run(tmp_path / "run", {"layers": FRAME}, {"kind": "profile"})
    write_run(tmp_path / "run", {"layers": FRAME.head(1)}, {"kind": "profile"}, overwrite=True)
    assert read_run(tmp_path / "run").tables["layers"].height == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", broken)
    with pytest.raises(KernelscopeError, match=r"run cannot be written \(disk full\); nothing was written"):
        write_run(tmp_path / "run", {"layers": FRAME}, {"kind": "profile"})
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KernelscopeError, match="exists and is not a folder"):
        write_run(blocker, {"layers": FRAME}, {})
    with pytest.raises(KernelscopeError, match="cannot be written"):
        write_run(blocker / "sub" / "run", {"layers": FRAME}, {})


def test_read_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(KernelscopeError, match="is not a folder"):
        read_run(tmp_path / "missing")
    with pytest.raises(KernelscopeError, match="not a kernelscope run folder"):
        read_run(tmp_path)
    run = write_run(tmp_path / "run", {"layers": FRAME}, {"kind": "profile"})
    (run / "layers.parquet").write_bytes(b"PAR1 damaged")
    with pytest.raises(KernelscopeError, match=r"layers\.parquet is damaged"):
        read_run(run)
    (run / "summary.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(KernelscopeError, match="newer than this kernelscope reads"):
        read_run(run)
    (run / "summary.json").write_text("{not json")
    with pytest.raises(KernelscopeError, match="damaged"):
        read_run(run)
