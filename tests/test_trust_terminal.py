"""What the terminal shows can be trusted: at any width every number of a table is printed whole (a table
too wide becomes one block of ``header: value`` lines per row), and a refused width names the value as
typed and the range it is out of."""

from __future__ import annotations

import json
import re

import pytest
from rich.cells import cell_len

from kernelscope.cli import console
from kernelscope.cli.console import pct
from kernelscope.cli.eval_cmd import interval
from tests.test_cli import run_cli
from tests.test_trust import assert_refused

WIDTHS = (40, 80)  # a narrow terminal; what rich uses when the output is piped


def shown_at(width: int, monkeypatch, capsys, *args: str) -> str:
    """stdout of a command run with the console ``width`` columns wide, checked to be a clean run that
    cuts nothing and keeps to the width."""
    monkeypatch.setattr(console.out, "_width", width)
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 0, stderr
    assert "…" not in stdout, stdout
    assert max(cell_len(line) for line in stdout.splitlines()) <= width, stdout
    return stdout


def words(stdout: str) -> set[str]:
    """Every word printed, table borders taken as spaces: a number cut or split would not be one."""
    return set(re.split(r"[\s│┃]+", stdout))


def test_every_number_of_a_profile_is_printed_whole(monkeypatch, capsys, tmp_path, tiny_llama_dir, text_file):
    for width in WIDTHS:
        out = tmp_path / f"profile-{width}"
        stdout = shown_at(width, monkeypatch, capsys, "profile", str(tiny_llama_dir), "-d", str(text_file),
                          "-n", "2", "-s", "32", "-q", "per_token,crossquant,nvfp4,mxfp4", "-b", "8,4",
                          "--weight-format", "per_token:4,nvfp4", "-o", str(out))
        s = json.loads((out / "summary.json").read_text())
        expected = set()
        for row in s["model_level"] + s["weights_model_level"]:
            expected |= {pct(row["kernel_fraction"]), f"{row['kernel_elements']:,}", f"{row['elements']:,}"}
        for row in s["model_level"]:
            shares = (row["subnormal_fraction"], row["block_kernel_fraction"])
            expected |= {pct(share) for share in shares if share is not None}
        for row in s["by_module_type"]:
            expected |= {pct(row["kernel_fraction"]), pct(row["c_ge_t_fraction"])}
        assert expected <= words(stdout), (width, sorted(expected - words(stdout)), stdout)
        titles = ("Model-level kernel", "Kernel by module type", "Weight kernel")
        assert all(title in stdout for title in titles)


def test_every_number_of_an_eval_is_printed_whole(monkeypatch, capsys, tmp_path, tiny_llama_dir, text_file):
    for width in WIDTHS:
        out = tmp_path / f"eval-{width}"
        stdout = shown_at(width, monkeypatch, capsys, "eval", str(tiny_llama_dir), "-d", str(text_file),
                          "-n", "2", "-s", "32", "--scheme", "fp,w8a8-per-token,w4a8-g128-crossquant,nvfp4",
                          "-o", str(out))
        expected = set()
        for r in json.loads((out / "summary.json").read_text())["results"]:
            expected |= {f"{r['perplexity']:.4f}", f"{r['seconds']:.1f}",
                         *interval(r["perplexity_ci_low"], r["perplexity_ci_high"]).split()}
            if r["mode"] != "fp":
                expected |= {pct(r["kernel_fraction"]), f"{r['change_pct']:+.2f}%"}
        assert expected <= words(stdout), (width, sorted(expected - words(stdout)), stdout)
        assert "w4a8-g128-crossquant" in words(stdout)


def test_a_table_too_wide_is_shown_as_blocks_under_its_title(monkeypatch, capsys):
    stdout = shown_at(40, monkeypatch, capsys, "formats")
    flat = " ".join(stdout.split())
    assert "number formats: -q NAME, --weight-format NAME" in flat  # the title, kept
    lines = stdout.splitlines()
    assert "name: nvfp4" in lines and "τ: 2^-2" in lines and "elements: e4m3 (max 448)" in lines
    assert "┃" not in stdout
    stdout = shown_at(200, monkeypatch, capsys, "formats")  # wide enough: the table as it always was
    assert re.search(r"┃ name +┃ elements +┃ τ +┃", stdout) and "name: nvfp4" not in stdout


@pytest.mark.parametrize(("command", "option", "value", "message"), [
    ("profile", "--weight-format", "per_token:1",
     "--weight-format per_token:1 is out of range; an INT weight quantizer takes 2 to 8 bits"),
    ("profile", "--weight-format", "nvfp4,per_channel:9",
     "--weight-format per_channel:9 is out of range; an INT weight quantizer takes 2 to 8 bits"),
    ("eval", "--scheme", "w3a16-per-token",
     "--scheme w3a16-per-token: the activations' width, a16, is out of range; wXaY takes 2 to 8 bits"),
    ("eval", "--scheme", "fp,w1a8-crossquant",
     "--scheme w1a8-crossquant: the weights' width, w1, is out of range; wXaY takes 2 to 8 bits"),
    ("advise", "--scheme", "w3a16-per-token", "--scheme w3a16-per-token: the activations' width, a16"),
    ("zeroshot", "--scheme", "w16a8-per-token", "--scheme w16a8-per-token: the weights' width, w16"),
], ids=["per_token:1", "per_channel:9", "eval w3a16", "eval w1a8", "advise w3a16", "zeroshot w16a8"])
def test_a_width_out_of_range_names_the_value_as_typed(command, option, value, message, capsys, tmp_path,
                                                       tiny_llama_dir, text_file):
    data = [] if command == "zeroshot" else ["-d", str(text_file)]
    args = [command, str(tiny_llama_dir), *data, option, value, "-o", str(tmp_path / "run")]
    assert_refused(capsys, args, message, tmp_path)
