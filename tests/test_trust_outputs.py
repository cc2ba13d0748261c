"""What kernelscope writes, through the command line: it recognises its own files by what they hold,
proves every output place writable before any work, leaves nothing half-written when a write fails at
the end, and writes only strict JSON and parquet tables that every common reader reads."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import polars as pl
import pytest

from tests.test_cli import run_cli
from tests.test_trust import assert_refused


def small(model_dir: Path, text: Path, *extra: str) -> list[str]:
    return [str(model_dir), "-d", str(text), "-n", "2", "-s", "32", *extra]


def strict_json(text: str):
    """Parse as a strict parser does: NaN and Infinity are not JSON."""
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def profile_run(tmp_path_factory, tiny_llama_dir, text_file) -> Path:
    out = tmp_path_factory.mktemp("runs") / "profile"
    code = _main(["profile", *small(tiny_llama_dir, text_file, "-q", "per_token", "-q", "mxfp4",
                                    "--weight-format", "nvfp4", "-o", str(out))])
    assert code == 0
    return out


def _main(args: list[str]) -> int:
    from kernelscope.cli.app import main

    try:
        main(args)
    except SystemExit as exc:
        return exc.code
    return 0


# --- kernelscope's own files, by content --------------------------------------------------------


def test_overwrite_keeps_a_users_parquet_file_in_a_run_folder(capsys, tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "run"
    args = ["profile", *small(tiny_llama_dir, text_file, "-o", str(out))]
    assert run_cli(capsys, *args)[0] == 0
    pl.DataFrame({"scale": [0.5, 0.25]}).write_parquet(out / "my_calibration.parquet")
    assert_refused(capsys, [*args, "--overwrite"],
                   "holds files kernelscope did not write (my_calibration.parquet)", tmp_path)


def test_a_kernelscope_file_the_user_changed_or_copied_in_is_theirs(capsys, tmp_path, tiny_llama_dir,
                                                                    text_file):
    out, other = tmp_path / "run", tmp_path / "other"
    args = ["profile", *small(tiny_llama_dir, text_file, "-o", str(out))]
    assert run_cli(capsys, *args)[0] == 0
    assert run_cli(capsys, "profile",
                   *small(tiny_llama_dir, text_file, "-q", "mxfp4", "-o", str(other)))[0] == 0
    (out / "theirs.parquet").write_bytes((other / "layers.parquet").read_bytes())  # a table, not this run's
    assert_refused(capsys, [*args, "--overwrite"], "(theirs.parquet)", tmp_path)
    (out / "theirs.parquet").unlink()
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps({**summary, "my_notes": "keep"}))
    assert_refused(capsys, [*args, "--overwrite"], "(summary.json)", tmp_path)


def test_overwrite_replaces_its_own_run_and_report_inside_it(capsys, tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "run"
    args = ["profile",
            *small(tiny_llama_dir, text_file, "-o", str(out), "--report", str(out / "report.html"))]
    assert run_cli(capsys, *args)[0] == 0
    assert (out / "report.html").is_file() and (out / "layers.parquet").is_file()
    code, _, stderr = run_cli(capsys, *args, "--overwrite")
    assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left beside it
    marker = strict_json((out / ".kernelscope-run").read_text())
    assert set(marker["files"]) == {"layers.parquet", "weights.parquet", "summary.json"}


def test_an_older_folder_without_a_file_list_is_judged_by_content(tmp_path):
    from kernelscope.results.paths import foreign_entries

    pl.DataFrame({"x": [1]}).write_parquet(tmp_path / "plain.parquet")
    pl.DataFrame({"x": [1]}).write_parquet(tmp_path / "layers.parquet",
                                           metadata={"kernelscope.table": "layers"})
    (tmp_path / "summary.json").write_text('{"schema_version": 2, "kind": "profile"}')
    (tmp_path / ".kernelscope-run").write_text('{"schema_version": 2, "summary": "summary.json"}')
    assert foreign_entries(tmp_path) == ["plain.parquet"]


# --- every output place proven writable first; a late failure leaves nothing ------------------------


@pytest.mark.parametrize("where", [["-o", "/proc/kernelscope-x"],
                                   ["-o", "OUT", "--report", "/proc/kernelscope-x.html"]])
def test_an_unwritable_place_is_refused_before_the_model_loads(where, capsys, tmp_path, monkeypatch,
                                                                tiny_llama_dir, text_file):
    import kernelscope.cli.common as common

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(common, "load_with_status", never)
    where = [str(tmp_path / "out") if w == "OUT" else w for w in where]
    for command in ("profile", "eval"):
        stderr = assert_refused(capsys, [command, *small(tiny_llama_dir, text_file, *where)],
                                "cannot be written", tmp_path)
        assert "/proc" in stderr and where[-2] in stderr


def test_a_write_that_fails_at_the_end_is_one_line_and_leaves_nothing(capsys, tmp_path, monkeypatch,
                                                                       tiny_llama_dir, text_file):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(pl.DataFrame, "write_parquet", full)
        stderr = assert_refused(capsys, ["eval", *small(tiny_llama_dir, text_file, "-o", str(out))],
                                f"-o {out} cannot be written (No space left on device); nothing was written",
                                tmp_path)
    assert "internal error" not in stderr


def test_a_report_that_fails_at_the_end_takes_the_run_folder_with_it(capsys, tmp_path, monkeypatch,
                                                                      tiny_llama_dir, text_file):
    import kernelscope.reports.html as html

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    out, report = tmp_path / "run", tmp_path / "pages" / "report.html"
    monkeypatch.setattr(html, "default_mode", full)
    assert_refused(capsys,
                   ["eval", *small(tiny_llama_dir, text_file, "-o", str(out), "--report", str(report))],
                   f"--report {report} cannot be written (No space left on device); nothing was written",
                   tmp_path)


def test_an_existing_run_survives_a_failed_overwrite(capsys, tmp_path, monkeypatch, tiny_llama_dir,
                                                     text_file):
    import kernelscope.reports.html as html

    out = tmp_path / "run"
    args = ["eval", *small(tiny_llama_dir, text_file, "-o", str(out), "--report", str(tmp_path / "r.html"))]
    assert run_cli(capsys, *args)[0] == 0

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(html, "default_mode", full)
    assert_refused(capsys, [*args, "--overwrite"], "nothing was written", tmp_path)


# --- strict JSON, readable tables -----------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny LLaMA with one NaN in its output projection: its logits are not finite."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("nan-llama")
    shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    return folder


def test_json_of_a_model_with_nonfinite_logits_is_strict(capsys, tmp_path, nan_model_dir, text_file):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(capsys, "eval", *small(nan_model_dir, text_file, "-o", str(out), "--json"))
    assert code == 0, stderr
    printed = strict_json(stdout)
    written = strict_json((out / "summary.json").read_text())
    fp = next(r for r in printed["results"] if r["scheme"] == "fp")
    assert fp["perplexity"] is None and fp["finite"] is False
    assert printed["results"] == written["results"]


def test_every_table_and_json_is_read_by_pyarrow_pandas_and_a_strict_parser(capsys, tmp_path, profile_run,
                                                                             tiny_llama_dir, text_file):
    import pandas as pd
    import pyarrow.parquet as pq

    from kernelscope.results.schema import COLUMNS

    runs = [profile_run]
    commands = {
        "eval": ["--scheme", "w8a8-per-token,nvfp4"],
        "threshold": ["--steps", "1"],
        "sweep": ["--alpha", "0.15,1"],
        "advise": ["--scheme", "w8a8-per-token", "--tolerance", "0.5"],
    }
    for command, extra in commands.items():
        out = tmp_path / command
        code, _, stderr = run_cli(capsys, command, *small(tiny_llama_dir, text_file, *extra, "-o", str(out)))
        assert code == 0, (command, stderr)
        runs.append(out)
    kinds = set()
    for run in runs:
        for file in run.glob("*.parquet"):
            arrow = pq.read_table(file)
            assert pd.read_parquet(file).shape == (arrow.num_rows, arrow.num_columns)
            meta = {k.decode(): v.decode() for k, v in pq.read_metadata(file).metadata.items()}
            kinds.add(meta["kernelscope.table"])
            declared = pl.Schema({name: COLUMNS[name].dtype for name in arrow.schema.names})
            assert pl.read_parquet(file).schema == declared, file
        for file in [*run.glob("*.json"), run / ".kernelscope-run"]:
            strict_json(file.read_text())
    assert {"layers", "weights", "eval", "threshold", "sweep", "sensitivity", "cells", "search"} <= kinds


def test_a_column_value_beyond_its_type_is_refused_at_the_option(capsys, tmp_path, tiny_llama_dir, text_file):
    for command in ("profile", "eval"):
        assert_refused(capsys, [command, *small(tiny_llama_dir, text_file, "--transform", "hadamard",
                                                "--transform-seed", "99999999999999999999",
                                                "-o", str(tmp_path / "x"))],
                       "--transform-seed 99999999999999999999 is out of range", tmp_path)


def test_the_written_tables_are_checked_against_the_schema(tmp_path):
    from kernelscope.results import write_run

    with pytest.raises(ValueError, match="outside its declared type"):
        write_run(tmp_path / "a", {"eval": pl.DataFrame({"transform_seed": [2**70]})}, {"kind": "eval"})
    with pytest.raises(ValueError, match="not declared"):
        write_run(tmp_path / "b", {"eval": pl.DataFrame({"my_column": [1]})}, {"kind": "eval"})
    assert list(tmp_path.iterdir()) == []


# --- a resumed run compares values ----------------------------------------------------------------


def test_resume_refuses_an_alpha_that_differs_below_its_label(capsys, tmp_path, tiny_llama_dir, text_file):
    import kernelscope as ks
    from kernelscope.quant import QuantizerConfig
    from kernelscope.runs.checkpoint import checkpoint_path

    loaded = ks.load_model(str(tiny_llama_dir))
    text = ks.load_text(str(text_file))
    windows = ks.make_windows(ks.tokenize(loaded.tokenizer, text.text), 32, 2)
    checkpoint = checkpoint_path(tmp_path / "run")
    ks.profile(loaded, windows, [QuantizerConfig("crossquant", 8, alpha=0.15)], text=text,
               checkpoint=checkpoint)
    args = ["profile", *small(tiny_llama_dir, text_file, "-q", "crossquant", "-b", "8", "-o",
                              str(tmp_path / "run"), "--resume")]
    stderr = assert_refused(capsys, [*args, "-a", "0.1500001"], "belongs to a different run", tmp_path)
    assert "0.15, None] in the checkpoint" in stderr and "0.1500001, None] now" in stderr
    code, _, stderr = run_cli(capsys, *args, "-a", "0.15")
    assert code == 0, stderr


# --- words that say what the figures say ----------------------------------------------------------


def test_a_scheme_better_than_fp_is_called_so_where_the_kernel_share_is_undefined():
    from kernelscope.runs.sensitivity import kernel_explains

    fp = {"window_nll": [3.0, 3.1, 3.2, 3.0]}
    better = {"window_nll": [2.8, 2.9, 3.0, 2.8], "vs_fp": "better than fp"}
    kernel = {"window_nll": [2.9, 3.0, 3.1, 2.9]}
    note = kernel_explains(better, kernel, fp)["note"]
    assert "better than fp" in note and "not separable" not in note
    unclear = {"window_nll": [3.0, 3.1, 3.2, 3.0], "vs_fp": "not separable from fp"}
    assert "not separable" in kernel_explains(unclear, kernel, fp)["note"]


def test_an_empty_ignore_file_says_on_screen_that_it_keeps_nothing(capsys, tmp_path, tiny_llama_dir,
                                                                    text_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("# no layers\n")
    code, stdout, stderr = run_cli(capsys, "eval", *small(tiny_llama_dir, text_file, "--scheme",
                                                          "w8a8-per-token", "--ignore", f"@{empty}"))
    assert code == 0, stderr
    flat = " ".join(stdout.split())
    assert f"--ignore @{empty} keeps no layer in full precision" in flat


# --- the second trial's inputs --------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--report", "OUT.json"], "does not end in .html"),
    (["--report", "pages/"], "--report pages does not end in .html"),  # the option's path type drops the /
    (["-o", "run", "--report", "run/layers.parquet"], "--report run/layers.parquet does not end in .html"),
    (["-o", "x" * 300], "longer than the 255 a file system allows"),
    (["--scheme", "w8a8-per-token,,fp"], "has an empty item"),
    (["-a", "0_1", "--scheme", "w8a8-crossquant"], "'0_1' is not a number"),
    (["--dtype", "float8"], "--dtype: unknown dtype"),
    (["--device", "tpu"], "--device: unknown device"),
    (["--scheme", "bogus1,fp,bogus2"], "--scheme: unknown schemes 'bogus1', 'bogus2'; use fp,"),
    (["--scheme", "fp,FP"], "--scheme FP is given twice (as fp)"),
])
def test_the_second_trial_is_refused_before_the_model_loads(args, message, capsys, tmp_path, monkeypatch,
                                                             tiny_llama_dir, text_file):
    import kernelscope.cli.common as common

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(common, "load_with_status", never)
    monkeypatch.chdir(tmp_path)
    assert_refused(capsys, ["eval", *small(tiny_llama_dir, text_file, *args)], message, tmp_path)


def test_an_empty_item_in_a_list_is_refused(capsys, tmp_path, tiny_llama_dir, text_file):
    assert_refused(capsys, ["profile", *small(tiny_llama_dir, text_file, "-q", "per_token,,crossquant")],
                   "-q 'per_token,,crossquant' has an empty item", tmp_path)
    assert_refused(capsys, ["profile", *small(tiny_llama_dir, text_file, "-a", ",0.2")],
                   "-a ',0.2' has an empty item", tmp_path)


def test_report_refuses_a_name_another_reader_expects(capsys, tmp_path, profile_run):
    assert_refused(capsys, ["report", str(profile_run), "-o", str(tmp_path / "x.json")],
                   "does not end in .html", tmp_path)


def test_threshold_steps_are_bounded(capsys, tmp_path, tiny_llama_dir, text_file):
    assert_refused(capsys, ["threshold", *small(tiny_llama_dir, text_file, "--steps", "1000")],
                   "--steps must be from 0 to 20, got 1000", tmp_path)


@pytest.mark.parametrize(("name", "body"), [("records.json", '{"text": "a"}'), ("table.csv", "text\na\n")])
def test_a_structured_file_is_not_read_as_raw_text(name, body, capsys, tmp_path, tiny_llama_dir):
    (tmp_path / name).write_text(body)
    assert_refused(capsys, ["profile", str(tiny_llama_dir), "-d", str(tmp_path / name)],
                   "which would be read as its raw text", tmp_path)


def test_a_byte_order_mark_is_not_part_of_the_text(tmp_path, text_file):
    from kernelscope.data import load_text

    marked = tmp_path / "marked.txt"
    marked.write_bytes(b"\xef\xbb\xbf" + text_file.read_bytes())
    assert load_text(str(marked)).text == load_text(str(text_file)).text


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path, tiny_llama_dir, text_file):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    command = ["profile", str(tiny_llama_dir), "-d", str(text_file), "-s", "16", "-o", str(out), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "kernelscope", *command], stderr=subprocess.PIPE,
                            text=True)
    checkpoint = tmp_path / ".run.checkpoint"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_kernel_groups_none_stands_alone(capsys, tmp_path, tiny_llama_dir, text_file):
    assert_refused(capsys, ["advise", *small(tiny_llama_dir, text_file, "--scheme", "w8a8-per-token",
                                             "--kernel-groups", "none,block")],
                   "--kernel-groups none,block: none measures no kernel and stands alone", tmp_path)
