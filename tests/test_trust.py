"""The promises a diagnostics tool lives on, through the command line: it never harms a file it did not
write, every option is honoured or refused, a resumed run is the same run, only causal decoders are
measured, and errors name what the user typed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pytest

from tests.test_cli import run_cli


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with the bytes of each file (None for a folder)."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


def assert_refused(capsys, args: list[str], message: str, root: Path) -> str:
    """One line on stderr holding ``message``, exit 2, and nothing under ``root`` changed."""
    before = tree(root)
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 2, (stdout, stderr)
    assert message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr + stdout
    assert tree(root) == before
    return stderr


# --- never harm what kernelscope did not write ---------------------------------------------------


@pytest.mark.parametrize("command", ["profile", "eval", "sweep", "threshold"])
def test_overwrite_never_replaces_a_folder_kernelscope_did_not_write(
    command, capsys, tmp_path, tiny_llama_dir, text_file
):
    mine = tmp_path / "myproject"
    mine.mkdir()
    (mine / "notes.txt").write_text("a week of work")
    assert_refused(
        capsys,
        [
            command,
            str(tiny_llama_dir),
            "-d",
            str(text_file),
            "-n",
            "2",
            "-s",
            "32",
            "-o",
            str(mine),
            "--overwrite",
        ],
        "holds files kernelscope did not write (notes.txt)",
        tmp_path,
    )


def test_overwrite_refuses_a_summary_like_folder_with_other_files(
    capsys, tmp_path, tiny_llama_dir, text_file
):
    looks = tmp_path / "looks-like-a-run"
    looks.mkdir()
    (looks / "summary.json").write_text(json.dumps({"schema_version": 1}))
    (looks / "thesis.tex").write_text("chapter one")
    assert_refused(
        capsys,
        ["profile", str(tiny_llama_dir), "-d", str(text_file), "-o", str(looks), "--overwrite"],
        "holds files kernelscope did not write (thesis.tex)",
        tmp_path,
    )


@pytest.mark.parametrize("where", [".", "..", "~", "/"])
def test_the_working_folder_its_parents_home_and_root_are_never_replaced(
    where, capsys, tmp_path, monkeypatch, tiny_llama_dir, text_file
):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert_refused(
        capsys,
        ["profile", str(tiny_llama_dir), "-d", str(text_file), "-o", where, "--overwrite"],
        "which kernelscope never replaces",
        tmp_path,
    )


def test_overwrite_replaces_its_own_run_and_report(capsys, tmp_path, tiny_llama_dir, text_file):
    out, report = tmp_path / "run", tmp_path / "r.html"
    args = [
        "profile",
        str(tiny_llama_dir),
        "-d",
        str(text_file),
        "-n",
        "1",
        "-s",
        "32",
        "-q",
        "per_token",
        "-b",
        "8",
        "-o",
        str(out),
        "--report",
        str(report),
    ]
    code, _, stderr = run_cli(capsys, *args)
    assert code == 0, stderr
    assert (out / ".kernelscope-run").is_file()
    first = (out / "summary.json").read_text()
    code, _, stderr = run_cli(capsys, *args, "--overwrite")
    assert code == 0, stderr
    assert (out / "summary.json").read_text() != first  # replaced: a new creation time
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    code, _, stderr = run_cli(capsys, "report", str(out), "-o", str(report), "--overwrite")
    assert code == 0, stderr


def test_a_run_folder_the_user_added_files_to_or_an_empty_folder_is_not_replaced(
    capsys, tmp_path, tiny_llama_dir, text_file
):
    from kernelscope.results import write_run

    run = write_run(tmp_path / "run", {"layers": pl.DataFrame({"tokens": [1]})}, {"kind": "profile"})
    (run / "analysis.ipynb").write_text("{}")
    (tmp_path / "empty").mkdir()
    args = ["profile", str(tiny_llama_dir), "-d", str(text_file), "--overwrite", "-o"]
    assert_refused(
        capsys, [*args, str(run)], "holds files kernelscope did not write (analysis.ipynb)", tmp_path
    )
    assert_refused(capsys, [*args, str(tmp_path / "empty")], "was not written by kernelscope", tmp_path)


def test_an_unmarked_run_of_an_earlier_version_is_replaceable(capsys, tmp_path, tiny_llama_dir, text_file):
    old = tmp_path / "old-run"
    old.mkdir()
    (old / "summary.json").write_text(json.dumps({"schema_version": 1, "kind": "profile"}))
    pl.DataFrame({"layer": ["a"]}).write_parquet(old / "layers.parquet")
    code, _, stderr = run_cli(
        capsys,
        "profile",
        str(tiny_llama_dir),
        "-d",
        str(text_file),
        "-n",
        "1",
        "-s",
        "32",
        "-q",
        "per_token",
        "-b",
        "8",
        "-o",
        str(old),
        "--overwrite",
    )
    assert code == 0, stderr
    assert pl.read_parquet(old / "layers.parquet").height == 14


def test_a_report_file_kernelscope_did_not_write_is_never_replaced(
    capsys, tmp_path, tiny_llama_dir, text_file
):
    run = tmp_path / "run"
    code, _, stderr = run_cli(
        capsys,
        "profile",
        str(tiny_llama_dir),
        "-d",
        str(text_file),
        "-n",
        "1",
        "-s",
        "32",
        "-q",
        "per_token",
        "-b",
        "8",
        "-o",
        str(run),
    )
    assert code == 0, stderr
    page = tmp_path / "index.html"
    page.write_text("<html>my home page</html>")
    assert_refused(
        capsys, ["report", str(run), "-o", str(page), "--overwrite"], "is not a kernelscope report", tmp_path
    )
    assert_refused(
        capsys,
        [
            "profile",
            str(tiny_llama_dir),
            "-d",
            str(text_file),
            "-o",
            str(tmp_path / "new"),
            "--report",
            str(page),
            "--overwrite",
        ],
        "--report",
        tmp_path,
    )


def test_a_foreign_file_where_the_checkpoint_goes_is_refused(capsys, tmp_path, tiny_llama_dir, text_file):
    (tmp_path / ".run.checkpoint").write_text("someone's file")
    assert_refused(
        capsys,
        ["profile", str(tiny_llama_dir), "-d", str(text_file), "-o", str(tmp_path / "run")],
        "was not written by kernelscope",
        tmp_path,
    )


def test_a_run_that_cannot_replace_its_folder_leaves_both_untouched(tmp_path, monkeypatch):
    from kernelscope.errors import KernelscopeError
    from kernelscope.results import write_run

    out = write_run(tmp_path / "run", {"t": pl.DataFrame({"tokens": [1]})}, {"kind": "x"})
    before = tree(tmp_path)
    real = os.replace

    def busy(src, dst):
        if Path(src) == out:
            raise OSError(16, "Device or resource busy")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", busy)
    with pytest.raises(KernelscopeError, match="cannot replace"):
        write_run(out, {"t": pl.DataFrame({"tokens": [2]})}, {"kind": "x"}, overwrite=True)
    assert tree(tmp_path) == before


# --- every option honoured or refused ------------------------------------------------------------

UNUSED = {
    "bits with float formats only": (["profile", "-q", "mxfp4,nvfp4", "-b", "4"], "-b has no effect here"),
    "group size without per_group": (
        ["profile", "-q", "mxfp4", "--group-size", "16"],
        "--group-size has no effect here",
    ),
    "weight bits with a wXaY scheme": (
        ["eval", "--scheme", "w8a8-per-token", "--weight-bits", "3"],
        "--weight-bits has no effect here: it applies to remove-kernel-*",
    ),
    "group size with a wXaY scheme": (
        ["eval", "--scheme", "w4a8-per-token", "--group-size", "64"],
        "--group-size has no effect here",
    ),
    "bits with a wXaY scheme": (["eval", "--scheme", "w8a8-crossquant", "-b", "4"], "-b has no effect here"),
    "alpha without crossquant": (
        ["eval", "--scheme", "w8a8-per-token", "--alpha", "0.3"],
        "--alpha has no effect here",
    ),
    "smooth alpha without smoothquant": (
        ["eval", "--smooth-alpha", "0.7"],
        "--smooth-alpha has no effect here",
    ),
    "calib dataset without smoothquant": (
        ["eval", "--calib-dataset", "pydoc"],
        "--calib-dataset has no effect",
    ),
    "calib nsamples without smoothquant": (
        ["eval", "--calib-nsamples", "4"],
        "--calib-nsamples has no effect",
    ),
    "seed without random windows": (["sweep", "--seed", "3"], "--seed has no effect here"),
    "overwrite without output": (["threshold", "--overwrite"], "--overwrite has no effect here"),
    "device with a device map": (
        ["profile", "--device", "cpu", "--device-map", "auto"],
        "--device has no effect here",
    ),
    "profile alpha without crossquant": (
        ["profile", "-q", "per_token", "-a", "0.3"],
        "-a has no effect here",
    ),
}


@pytest.mark.parametrize("case", sorted(UNUSED))
def test_an_option_without_effect_is_refused(case, capsys, tmp_path, tiny_llama_dir, text_file):
    (command, *args), message = UNUSED[case]
    assert_refused(capsys, [command, str(tiny_llama_dir), "-d", str(text_file), *args], message, tmp_path)


def test_options_that_do_apply_are_accepted(capsys, tiny_llama_dir, text_file):
    code, stdout, stderr = run_cli(
        capsys,
        "eval",
        str(tiny_llama_dir),
        "-d",
        str(text_file),
        "-n",
        "2",
        "-s",
        "32",
        "--json",
        "--windows",
        "RANDOM",
        "--seed",
        "1",
        "--scheme",
        "remove-kernel-crossquant",
        "--weight-bits",
        "4",
        "--group-size",
        "16",
        "-b",
        "4",
        "-a",
        "0.3",
    )
    assert code == 0, stderr
    (row,) = json.loads(stdout)["results"]
    assert (row["weight_bits"], row["group_size"], row["activation_bits"], row["alpha"]) == (4, 16, 4, 0.3)


# --- a resumed run is the same run ---------------------------------------------------------------


def test_resume_refuses_a_changed_dtype_and_names_it(capsys, tmp_path, tiny_llama_dir, text_file):
    import kernelscope as ks
    from kernelscope.runs.checkpoint import checkpoint_path

    loaded = ks.load_model(str(tiny_llama_dir))
    text = ks.load_text(str(text_file))
    windows = ks.make_windows(ks.tokenize(loaded.tokenizer, text.text), 32, 2)
    checkpoint = checkpoint_path(tmp_path / "run")
    ks.profile(loaded, windows, ks.default_configs(), text=text, checkpoint=checkpoint)
    assert checkpoint.is_file()  # kept after the first of two windows
    args = [
        "profile",
        str(tiny_llama_dir),
        "-d",
        str(text_file),
        "-n",
        "2",
        "-s",
        "32",
        "-o",
        str(tmp_path / "run"),
        "--resume",
    ]
    stderr = assert_refused(capsys, [*args, "--dtype", "bfloat16"], "belongs to a different run", tmp_path)
    assert "dtype: torch.float32 in the checkpoint, torch.bfloat16 now" in stderr
    stderr = assert_refused(capsys, [*args, "--top-k", "3"], "top_k: 10 in the checkpoint, 3 now", tmp_path)
    code, _, stderr = run_cli(capsys, *args)
    assert code == 0, stderr


def test_the_checkpoint_fingerprint_covers_what_changes_a_figure(tiny_llama_dir, text_file):
    import kernelscope as ks
    from kernelscope.runs.profiling import _fingerprint

    loaded = ks.load_model(str(tiny_llama_dir))
    text = ks.load_text(str(text_file))
    windows = ks.make_windows(ks.tokenize(loaded.tokenizer, text.text), 32, 2)
    layers = ks.select_linear_layers(loaded.model)
    from kernelscope.runs.target_kernels import TargetKernels
    from kernelscope.runs.transforming import identity_transform

    print_ = _fingerprint(loaded.model, loaded.info, text, windows, ks.default_configs(), layers, 1, 10,
                          [identity_transform(layers)], None, TargetKernels([], {}))
    assert {
        "targets",
        "transforms",
        "calibration",
        "model_identity",
        "dtype",
        "device",
        "text",
        "windows",
        "layers",
        "quantizers",
        "batch_size",
        "kernelscope",
        "torch",
    } <= set(print_)
    assert print_["model_identity"].startswith("files:") and print_["device"] == "cpu"


def test_the_model_identity_follows_the_files(tmp_path, tiny_llama_dir):
    import shutil

    from kernelscope.models.loading import model_identity, resolve_model_source

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    first = model_identity(resolve_model_source(str(copy)), None)
    assert model_identity(resolve_model_source(str(copy)), None) == first
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # a changed weight keeps the size; the modification time moves
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(1, 1))
    assert model_identity(resolve_model_source(str(copy)), None) != first


# --- only causal decoders ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, message",
    [("bert", "is an encoder (BertLMHeadModel, model type bert)"), ("t5", "is an encoder-decoder")],
)
def test_encoders_and_encoder_decoders_are_refused(kind, message, capsys, tmp_path, tokenizer, text_file):
    import transformers as tf

    folder = tmp_path / kind
    if kind == "bert":
        config = tf.BertConfig(
            vocab_size=512,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            architectures=["BertLMHeadModel"],
        )
    else:
        config = tf.T5Config(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for command in ("profile", "eval", "layers"):
        extra = [] if command == "layers" else ["-d", str(text_file), "-s", "32"]
        stderr = assert_refused(capsys, [command, str(folder), *extra], message, tmp_path)
        assert "not a causal decoder" in stderr


# --- errors name what the user typed; no internal errors ----------------------------------------

NAMED = {
    "weight format without bits": (
        ["profile", "--weight-format", "per_token"],
        "--weight-format 'per_token': an INT weight quantizer needs its bits",
    ),
    "float weight format with bits": (
        ["profile", "--weight-format", "mxfp4:8"],
        "mxfp4 carries its own width",
    ),
    "crossquant as a weight format": (
        ["profile", "--weight-format", "crossquant:8"],
        "unknown weight quantizer",
    ),
    "unknown format": (["profile", "-q", "mxfp5"], "unknown quantizer 'mxfp5'; choose from per_token"),
    "seqlen one for perplexity": (["eval", "-s", "1"], "-s must be at least 2, got 1"),
    "seqlen one for sweep": (["sweep", "--seqlen", "1"], "--seqlen must be at least 2"),
    "seqlen one for threshold": (["threshold", "-s", "1"], "-s must be at least 2"),
    "smooth alpha out of range": (
        ["eval", "--scheme", "w8a8-smoothquant", "--smooth-alpha", "2"],
        "--smooth-alpha 2 is out of range",
    ),
    "calibration text offline": (
        ["eval", "--scheme", "w8a8-smoothquant", "--calib-dataset", "pileval"],
        "--calib-dataset pileval needs the Hugging Face hub",
    ),
    "short alpha": (["profile", "-a", "1.5"], "-a 1.5 is out of range"),
    "alpha list with a bad separator": (
        ["profile", "--alpha", "0.15;0.3"],
        "--alpha '0.15;0.3' is not a number; give values repeated",
    ),
    "eval takes one alpha": (
        ["eval", "--scheme", "w8a8-crossquant", "--alpha", "0.15,0.3"],
        "--alpha '0.15,0.3': this command takes one value",
    ),
    "bits list entry": (["profile", "-b", "8,x"], "-b 'x' is not a whole number"),
    "tolerance far too large": (["threshold", "--tolerance", "1e9"], "--tolerance 1e+09 is beyond 1"),
    "unknown family": (["threshold", "--family", "per-row"], "unknown --family 'per-row'; choose per-token"),
    "offload folder is a file": (
        ["profile", "--device-map", "auto", "--offload-folder", "{file}"],
        "--offload-folder {file} exists and is not a folder",
    ),
    "windows unknown": (["sweep", "--windows", "Middle"], "--windows must be `first` or `random`"),
}


@pytest.mark.parametrize("case", sorted(NAMED))
def test_errors_name_the_option_as_typed(case, capsys, tmp_path, tiny_llama_dir, text_file):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    (command, *args), message = NAMED[case]
    args = [a.format(file=a_file) for a in args]
    assert_refused(
        capsys,
        [command, str(tiny_llama_dir), "-d", str(text_file), "-o", str(tmp_path / "o"), *args],
        message.format(file=a_file),
        tmp_path,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["threshold", "--family", "PER-TOKEN"],
        ["threshold", "--family", "CrossQuant"],
        ["profile", "--windows", "RANDOM"],
        ["profile", "-q", "PER_TOKEN,crossquant", "-b", "8", "-b", "4", "-a", "0.15,0.45"],
        ["eval", "--scheme", "W8A8-Per-Token"],
        ["profile", "--device", "CPU"],
    ],
)
def test_choices_are_case_insensitive_and_lists_comma_separated(args, capsys, tmp_path, tiny_llama_dir):
    # the text is the one thing wrong here, so the choices before it were all accepted
    command, *rest = args
    assert_refused(
        capsys,
        [command, str(tiny_llama_dir), *rest, "-d", "wikitext3"],
        "unknown dataset 'wikitext3'",
        tmp_path,
    )


def test_a_parquet_text_column_of_another_type_says_so(capsys, tmp_path, tiny_llama_dir):
    path = tmp_path / "numbers.parquet"
    pl.DataFrame({"text": [1, 2, 3]}).write_parquet(path)
    assert_refused(
        capsys,
        ["profile", str(tiny_llama_dir), "-d", str(path)],
        "column 'text' holds Int64, not strings",
        tmp_path,
    )


def test_a_folder_named_like_a_gguf_file(capsys, tmp_path):
    folder = tmp_path / "fake.gguf"
    folder.mkdir()
    assert_refused(capsys, ["layers", str(folder)], "fake.gguf is a folder, not a GGUF file", tmp_path)


@pytest.mark.parametrize("command", ["profile", "eval", "threshold", "sweep", "zeroshot", "report", "layers",
                                     "version"])
def test_help_shows_value_names_not_type_labels(command, capsys):
    code, stdout, _ = run_cli(capsys, command, "--help")
    assert code == 0
    for label in ("<bool>", "<str>", "<int>", "<float>", "<list", "{model}", "{MODEL}", "<Path"):
        assert label not in stdout, (label, stdout)
    if command in ("profile", "eval", "threshold", "sweep", "zeroshot", "layers"):
        assert "Usage: kernelscope " + command + " [OPTIONS] MODEL" in stdout


def test_help_shows_the_defaults_written_in_the_text(capsys):
    import importlib
    import re

    files = [Path(importlib.import_module(f"kernelscope.cli.{name}").__file__) for name in ("app", "options")]
    source = "".join(f.read_text(encoding="utf-8") for f in files)  # options are declared in options.py
    written = re.findall(r"\\\\\[default: ([^\]]+)\]", source)  # the defaults the help text spells out itself
    assert len(written) >= 10
    shown = []
    for command in ("profile", "eval", "threshold", "sweep", "zeroshot", "advise"):
        _code, stdout, _ = run_cli(capsys, command, "--help")
        shown.append(" ".join(stdout.replace("│", " ").split()))
    for value in written:
        assert any(f"[default: {' '.join(value.split())}]" in text for text in shown), value


def test_version_flag(capsys):
    from kernelscope import __version__

    code, stdout, _ = run_cli(capsys, "--version")
    assert code == 0 and stdout.strip() == f"kernelscope {__version__}"


# --- found by a second sweep of awkward inputs ---------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["profile", "-n", "2", "-n", "3"], "-n given 2 times; --nsamples takes one value"),
        (["profile", "-o", "a", "--output", "b"], "-o and --output given 2 times"),
        (["eval", "--scheme", "w8a8-crossquant", "-a", "0.1", "-a", "0.2"], "-a given 2 times"),
        (
            ["profile", "--windows", "random", "--seed", "99999999999999999999"],
            "--seed 99999999999999999999 is out",
        ),
    ],
)
def test_more_refusals_before_any_work(args, message, capsys, tmp_path, tiny_llama_dir, text_file):
    command, *rest = args
    assert_refused(capsys, [command, str(tiny_llama_dir), "-d", str(text_file), *rest], message, tmp_path)


def test_symbolic_links_are_never_written_through_or_replaced(capsys, tmp_path, tiny_llama_dir, text_file):
    from kernelscope.results import write_run

    run = write_run(tmp_path / "run", {"layers": pl.DataFrame({"tokens": [1]})}, {"kind": "profile"})
    (tmp_path / "link").symlink_to(run)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    args = ["profile", str(tiny_llama_dir), "-d", str(text_file), "-n", "1", "-s", "32", "--overwrite", "-o"]
    for link in ("link", "dangling"):
        assert_refused(capsys, [*args, str(tmp_path / link)], "is a symbolic link", tmp_path)
        assert (tmp_path / link).is_symlink()


def test_a_foreign_folder_is_not_met_with_advice_to_overwrite_it(capsys, tmp_path, tiny_llama_dir, text_file):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    stderr = assert_refused(
        capsys,
        ["profile", str(tiny_llama_dir), "-d", str(text_file), "-o", str(mine)],
        "holds files kernelscope did not write (notes.txt)",
        tmp_path,
    )
    assert "--overwrite" not in stderr


def test_report_refuses_a_run_given_twice_and_a_malformed_summary(capsys, tmp_path):
    from kernelscope.results import write_run

    run = write_run(tmp_path / "run", {"layers": pl.DataFrame({"tokens": [1]})},
                    {"kind": "profile", "model": "x"})
    assert_refused(
        capsys,
        ["report", str(run), str(tmp_path / "run" / "."), "-o", str(tmp_path / "r.html")],
        "is given twice",
        tmp_path,
    )
    assert_refused(
        capsys, ["report", str(run), "-o", str(tmp_path / "r.html")], "is incomplete or damaged", tmp_path
    )
    assert_refused(capsys, ["report", str(run), "-o", ""], "give a file name such as report.html", tmp_path)


def test_a_batch_larger_than_the_windows_is_the_windows(capsys, tmp_path, tiny_llama_dir, text_file):
    code, stdout, stderr = run_cli(
        capsys,
        "profile",
        str(tiny_llama_dir),
        "-d",
        str(text_file),
        "-n",
        "2",
        "-s",
        "32",
        "--batch-size",
        "1000000000",
        "--json",
    )
    assert code == 0, stderr
    assert json.loads(stdout)["settings"]["batch_size"] == 2  # the batch that ran: every window at once


def test_calibration_errors_name_the_calibration_options(capsys, tmp_path, tiny_llama_dir, text_file):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    assert_refused(
        capsys,
        [
            "eval",
            str(tiny_llama_dir),
            "-d",
            str(text_file),
            "-n",
            "1",
            "-s",
            "64",
            "--scheme",
            "w8a8-smoothquant",
            "--calib-dataset",
            str(short),
        ],
        "the calibration text (--calib-dataset) has",
        tmp_path,
    )
    assert_refused(
        capsys,
        [
            "eval",
            str(tiny_llama_dir),
            "-d",
            str(text_file),
            "-n",
            "1",
            "-s",
            "64",
            "--scheme",
            "w8a8-smoothquant",
            "--calib-dataset",
            str(text_file),
            "--calib-nsamples",
            "100000",
        ],
        "--calib-nsamples 100000 asks for more windows",
        tmp_path,
    )


def test_a_tied_gguf_head_sent_to_disk_is_named_before_the_forward_pass():
    from types import SimpleNamespace

    from kernelscope.models.loading import _tied_head_on_disk

    tied, untied = (SimpleNamespace(config=SimpleNamespace(tie_word_embeddings=t)) for t in (True, False))
    assert _tied_head_on_disk(tied, {"": "disk"})
    assert _tied_head_on_disk(tied, {"model": "cpu", "lm_head": "disk"})
    assert not _tied_head_on_disk(tied, {"model.layers.3": "disk", "lm_head": "cpu"})
    assert not _tied_head_on_disk(untied, {"": "disk"})
