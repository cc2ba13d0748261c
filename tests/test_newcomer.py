"""A newcomer's path: progress from the first second, the same default number of windows in every command,
suggested commands that run as written offline, refusals that say how to go on, and one line under
torchrun."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernelscope.cli import console
from kernelscope.cli.app import DEFAULT_WINDOWS
from kernelscope.reports import build_report
from kernelscope.results import read_run
from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
WINDOWED = ("profile", "eval", "threshold", "sweep", "advise")


@pytest.fixture
def terminal(monkeypatch):
    """stderr taken for a terminal, as when a person runs the command (it is captured all the same), wide
    enough that no line of the display wraps."""
    monkeypatch.setattr(console.err, "_force_terminal", True)
    monkeypatch.setattr(console.err, "is_interactive", True)
    monkeypatch.setattr(console.err, "_width", 200)


def plain(stderr: str) -> str:
    """What the display wrote, without its cursor and colour codes."""
    return CONTROL.sub("", stderr).replace("\r", "\n")


def test_progress_is_shown_from_the_first_stage_before_any_window(capsys, terminal, tiny_llama_dir,
                                                                  text_file):
    console._started[0] = time.monotonic() - 3600  # an hour ago: the clock must restart with the command
    code, stdout, stderr = run_cli(capsys, "profile", str(tiny_llama_dir), "-d", str(text_file), "-n", "3",
                                   "-s", "64")
    assert code == 0, stderr
    shown = plain(stderr)
    stages = [f"reading the text (-d {text_file})", f"loading model {tiny_llama_dir}",
              "tokenizing the text and choosing 64-token windows", "profiling: 1 pass × 3 windows"]
    at = [shown.index(stage) for stage in stages]  # each announced, in the order it happens
    assert at == sorted(at)
    windows = [m.start() for m in re.finditer(r"\b[0-3]/3\b", shown)]  # the bars' window counts
    assert windows and min(windows) > at[-1]  # no window counted before the stages were announced
    clocks = re.findall(r"(\d+):(\d\d) elapsed", shown)
    assert clocks and all(int(m) < 5 for m, _ in clocks)  # counted from this command's start, not earlier
    assert "Model-level kernel" in stdout and "elapsed" not in stdout


@pytest.mark.parametrize("flag", ["--quiet", "--json"])
def test_quiet_and_json_show_nothing_on_stderr(flag, capsys, terminal, tiny_llama_dir, text_file):
    code, stdout, stderr = run_cli(capsys, "eval", str(tiny_llama_dir), "-d", str(text_file), "-n", "2",
                                   "-s", "32", "--scheme", "fp", flag)
    assert code == 0 and stderr == ""
    if flag == "--json":
        assert json.loads(stdout)["results"][0]["scheme"] == "fp"  # stdout is JSON and nothing else


def test_every_pass_is_announced_with_the_time_left(capsys, terminal, tiny_llama_dir, text_file):
    code, _, stderr = run_cli(capsys, "eval", str(tiny_llama_dir), "-d", str(text_file), "-n", "3",
                              "-s", "32", "--scheme", "fp,w8a8-per-token")
    assert code == 0, stderr
    shown = plain(stderr)
    assert "evaluating: 2 passes × 3 windows" in shown
    assert shown.index("evaluating: 2 passes") < shown.index("w8a8-per-token")
    assert re.search(r"\d+:\d\d elapsed, ~\d+:\d\d left", shown)  # the whole run's, once a window is timed
    assert re.search(r"\b6/6\b", shown)  # the whole run: 2 passes of 3 windows


@pytest.mark.parametrize("command", WINDOWED)
def test_every_command_reads_the_same_default_windows_and_says_so(command, capsys):
    code, stdout, _ = run_cli(capsys, command, "--help")
    assert code == 0
    flat = " ".join(stdout.replace("│", " ").split())
    assert "N|all" in flat and f"[default: {DEFAULT_WINDOWS}]" in flat
    assert "The same default in every command" in flat and "`all` for every window" in flat


def test_the_default_and_all(capsys, tiny_llama_dir, text_file):
    code, stdout, stderr = run_cli(capsys, "profile", str(tiny_llama_dir), "-d", str(text_file), "-s", "64",
                                   "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["windows"]["windows"] == int(DEFAULT_WINDOWS)
    code, stdout, stderr = run_cli(capsys, "eval", str(tiny_llama_dir), "-d", str(text_file), "-s", "128",
                                   "-n", "ALL", "--scheme", "fp", "--json")
    assert code == 0, stderr
    windows = json.loads(stdout)["windows"]
    assert windows["windows"] == windows["available_windows"] > int(DEFAULT_WINDOWS)


def test_a_hub_text_offline_says_how_to_run_offline(capsys, tiny_llama_dir):
    code, _, stderr = run_cli(capsys, "eval", str(tiny_llama_dir), "-s", "32")  # --dataset's default
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    flat = " ".join(stderr.split())
    assert "--dataset wikitext2 needs the Hugging Face hub" in flat
    assert "to run offline, give --dataset pydoc" in flat and "--dataset path/to/text.txt" in flat


def run_suggested(capsys, command: str) -> tuple[int, str, str]:
    """A suggested command run as written (through the shell's word splitting)."""
    words = shlex.split(command)
    assert words[0] == "kernelscope"
    return run_cli(capsys, *words[1:])


def test_the_reports_suggestions_repeat_the_runs_model_text_and_windows(capsys, tmp_path, tiny_llama_dir,
                                                                        text_file, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the suggestions write under runs/ where they are run
    code, _, stderr = run_cli(capsys, "profile", str(tiny_llama_dir), "-d", str(text_file), "-n", "2",
                              "-s", "32", "-o", "profiled")
    assert code == 0, stderr
    text = build_report([read_run(tmp_path / "profiled")])
    for command in ("threshold", "sweep", "eval", "advise"):
        assert f"kernelscope {command} {tiny_llama_dir} -d {text_file} -s 32 -n 2 " in text, command
    assert f"kernelscope zeroshot {tiny_llama_dir} --scheme" in text  # it reads tasks, not windows
    suggested = re.search(r"<code>(kernelscope threshold [^<]*)</code> fills this section", text)[1]
    code, _, stderr = run_suggested(capsys, suggested.replace("&#x27;", "'"))
    assert code == 0, stderr
    both = build_report([read_run(tmp_path / "profiled"), read_run(tmp_path / "runs" / "threshold")])
    assert "different text, windows or lengths" not in both  # the suggestion measured the same windows


def test_advise_prints_the_eval_that_measures_its_plan_again(capsys, tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "plan"
    code, stdout, stderr = run_cli(capsys, "advise", str(tiny_llama_dir), "-d", str(text_file), "-n", "3",
                                   "-s", "64", "--scheme", "w4a8-crossquant", "-a", "0.3", "--tolerance",
                                   "0.0001", "-o", str(out))
    assert code == 0, stderr
    flat = " ".join(stdout.split())
    again = flat.split("measure the plan again, on the same text and windows: ", 1)[1].strip()
    assert again.startswith(f"kernelscope eval {tiny_llama_dir} -d {text_file} -s 64 -n 3")
    assert "-a 0.3" in again and f"--ignore @{out}" in again
    code, stdout, stderr = run_suggested(capsys, again + " --json")
    assert code == 0, stderr
    plan = json.loads((out / "summary.json").read_text())["plan"]
    row = next(r for r in json.loads(stdout)["results"] if r["scheme"] == "w4a8-crossquant")
    assert row["perplexity"] == plan["perplexity"]  # the same layers kept, on the same windows


def test_within_the_tolerance_by_its_point_estimate_says_so_in_both_places(capsys):
    from kernelscope.cli.advise_cmd import _show_plan
    from kernelscope.reports.html import point_estimate_only

    plan = {"kept_layers": 1, "quantized_layers": 13, "parameter_share": 0.05, "kept_cells": ["mlp"],
            "perplexity": 10.0, "perplexity_ci_low": 9.0, "perplexity_ci_high": 11.0, "change_pct": 0.5,
            "change_pct_ci_low": -1.0, "change_pct_ci_high": 2.5, "vs_fp": "not separable from fp",
            "within_tolerance": True}
    summary = {"plan": plan, "tolerance": 0.01, "budget": None, "forward_passes": 5.0, "runs": 5,
               "groups": {"count": 2}, "pass_budget": 5, "seconds": 1.0,
               "exports": {"recipe": "recipe.yaml", "recipe_scheme": None, "modelopt": "m.json",
                           "modules": "modules.txt", "recipe_note": None, "modelopt_note": None, "notes": []}}
    _show_plan(summary)
    shown = " ".join(capsys.readouterr().out.split())
    words = point_estimate_only(plan, 0.01)
    assert words == ("within the 1% tolerance by its point estimate only: its interval reaches +2.50%, "
                     "beyond it; more windows (-n) narrow the interval")
    assert words in shown
    assert point_estimate_only(plan | {"change_pct_ci_high": 0.9}, 0.01) is None  # the interval is within
    assert point_estimate_only(plan | {"within_tolerance": False}, 0.01) is None


def test_the_threshold_says_in_words_how_often_the_break_holds(capsys, tiny_llama_dir, text_file):
    code, stdout, stderr = run_cli(capsys, "threshold", str(tiny_llama_dir), "-d", str(text_file), "-n", "4",
                                   "-s", "32", "--steps", "2", "--json")
    assert code == 0, stderr
    search = json.loads(stdout)["searches"][0]
    code, stdout, stderr = run_cli(capsys, "threshold", str(tiny_llama_dir), "-d", str(text_file), "-n", "4",
                                   "-s", "32", "--steps", "2")
    assert code == 0, stderr
    flat = " ".join(stdout.split())
    assert "observed bracket" not in flat
    share = (search["crossing_uncertainty"] or {}).get("bracket_probability")
    if share is not None:
        assert f"in {100 * share:.0f}% of bootstrap resamples of the windows" in flat


def test_report_help_names_every_kind_of_run(capsys):
    code, stdout, _ = run_cli(capsys, "report", "--help")
    flat = " ".join(stdout.replace("│", " ").split())
    assert code == 0 and "profile, eval, threshold, sweep, advise or zeroshot" in flat


def test_a_refusal_under_torchrun_is_one_line_from_the_first_process(tmp_path):
    """A refused run says its one line from the first process only and exits non-zero; what follows is
    torchrun's own report of the failed processes, never a kernelscope traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "kernelscope", "profile", "nobody/no-such-model", "-o", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    ours = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1, run.stderr
    assert run.returncode != 0 and "kernelscope/" not in run.stderr and "ChildFailedError" in run.stderr
    assert not (tmp_path / "run").exists()


def test_a_later_process_says_nothing_and_alone_exit_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "kernelscope", "eval", "nobody/no-such-model"]  # refused before any work
    later = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env=env | {"WORLD_SIZE": "2", "RANK": "1"})
    assert later.returncode == 2 and later.stderr == "" and later.stdout == ""
    alone = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert alone.returncode == 2 and len(alone.stderr.strip().splitlines()) == 1

