"""The command line, end to end on a tiny local model, and every bad input it must refuse cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from kernelscope.cli import main
from kernelscope.results import SCHEMA_VERSION

REQUIRED_COLUMNS = {
    "layer", "block", "module_type", "quantizer", "bits", "alpha", "elements", "kernel_elements",
    "kernel_fraction", "bound_mean", "bound_p50", "bound_p90", "bound_p99",
    "bound_below_per_token_fraction", "c_ge_t_fraction", "abs_max", "top_channels", "top_tokens",
}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_profile_end_to_end(capsys, tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(capsys, "profile", str(tiny_llama_dir), "--dataset", str(text_file),
                                   "--nsamples", "3", "--seqlen", "64", "--output", str(out))
    assert code == 0, stderr
    assert "Model-level kernel" in stdout and "per_token int8" in stdout and "q_proj" in stdout
    flat = " ".join(stdout.replace("│", " ").split())  # the panel wraps long lines
    assert "3 of " in flat and "(the first 3, in text order)" in flat
    layers = pl.read_parquet(out / "layers.parquet")
    assert set(layers.columns) >= REQUIRED_COLUMNS
    assert layers.height == 14 * 4  # 2 blocks x 7 Linear layers, 4 default configurations
    assert set(layers["quantizer"]) == {"per_token", "crossquant"} and set(layers["bits"]) == {8, 4}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schema_version"] == SCHEMA_VERSION and summary["kind"] == "profile"
    assert summary["windows"]["windows"] == 3 and summary["windows"]["seqlen"] == 64
    assert len(summary["text"]["sha256"]) == 64 and summary["versions"]["kernelscope"]
    levels = {(r["quantizer"], r["bits"]): r["kernel_fraction"] for r in summary["model_level"]}
    pt8 = layers.filter((pl.col("quantizer") == "per_token") & (pl.col("bits") == 8))
    assert levels[("per_token", 8)] == pt8["kernel_elements"].sum() / pt8["elements"].sum()


def test_profile_json_and_options(capsys, tiny_llama_dir, text_file):
    code, stdout, stderr = run_cli(
        capsys, "profile", str(tiny_llama_dir), "-d", str(text_file), "-n", "2", "-s", "32", "--json",
        "-q", "crossquant", "-a", "0.15", "-a", "1", "-b", "8", "--layers", r"mlp\.", "--windows", "random",
        "--seed", "5", "--batch-size", "2",
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert [q["label"] for q in summary["quantizers"]] == ["crossquant a=0.15 int8", "crossquant a=1 int8"]
    assert summary["layers"]["count"] == 6
    assert summary["windows"]["selection"] == "random" and summary["windows"]["seed"] == 5


def test_layers_and_version_commands(capsys, tiny_llama_dir):
    code, stdout, _ = run_cli(capsys, "layers", str(tiny_llama_dir))
    assert code == 0 and "model.layers.1.mlp.down_proj" in stdout and "14 Linear layers" in stdout
    code, stdout, _ = run_cli(capsys, "version")
    assert code == 0 and "kernelscope" in json.loads(stdout)


BAD = {
    "unknown hub model": (["nobody/no-such-model"], "hub cannot be reached"),
    "missing folder": (["./missing-model-folder"], "model not found"),
    "missing gguf": (["absent.gguf"], "GGUF file not found"),
    "nsamples zero": (["{model}", "--nsamples", "0"], "--nsamples must be at least 1"),
    "nsamples negative": (["{model}", "--nsamples", "-3"], "--nsamples must be at least 1"),
    "nsamples not a number": (["{model}", "--nsamples", "many"],
                              "--nsamples 'many' is not a number of windows; give a whole number, or all"),
    "nsamples grouped digits": (["{model}", "-n", "1_0"], "-n '1_0' is not a number of windows"),
    "seqlen zero": (["{model}", "--seqlen", "0"], "--seqlen must be at least 1"),
    "seqlen beyond context": (["{model}", "--seqlen", "512", "-n", "1"], "beyond the model's context of 256"),
    "alpha above one": (["{model}", "--alpha", "1.5"], "--alpha 1.5 is out of range"),
    "alpha negative": (["{model}", "--alpha", "-0.1"], "--alpha -0.1 is out of range"),
    "alpha nan": (["{model}", "--alpha", "nan"], "--alpha nan is out of range"),
    "bits one": (["{model}", "--bits", "1"], "--bits 1 is out of range"),
    "bits nine": (["{model}", "--bits", "9"], "--bits 9 is out of range"),
    "unknown quantizer": (["{model}", "-q", "per_row"], "unknown quantizer 'per_row'"),
    "bad regex": (["{model}", "--layers", "(q_proj"], "not a valid regular expression"),
    "regex matches nothing": (["{model}", "--layers", "no_such_layer", "-s", "64"], "no Linear layers match"),
    "unknown dtype": (["{model}", "--dtype", "float8"], "unknown dtype"),
    "cuda without cuda": (["{model}", "--device", "cuda"], "CUDA is not available"),
    "unknown dataset": (["{model}", "--dataset", "wikitext3"], "unknown dataset"),
    "empty text": (["{model}", "--dataset", "{empty}"], "is empty"),
    "text shorter than a window": (["{model}", "--dataset", "{short}", "-s", "128"], "fewer than one window"),
    "hub dataset offline": (["{model}", "--dataset", "wikitext2"], "needs the Hugging Face hub"),
    "too many windows": (["{model}", "-n", "100000", "-s", "64"], "asks for more windows"),
    "report is a folder": (["{model}", "--report", "{folder}"], "is a folder"),
    "report is the output folder": (["{model}", "--report", "{folder}/out"], "is the --output folder"),
    "empty dataset name": (["{model}", "--dataset", ""], "no dataset given"),
    "corrupt gguf": (["{corrupt_gguf}"], "cannot"),
    "truncated gguf": (["{truncated_gguf}"], "cannot"),
    "folder without tokenizer": (["{no_tokenizer}", "-s", "64"], "cannot load a tokenizer"),
    "not a causal lm": (["{vit}", "-s", "64"], "not a causal language model"),
    "binary text": (["{model}", "--dataset", "{binary}"], "looks like a binary file"),
    "non-utf8 text": (["{model}", "--dataset", "{latin1}"], "is not UTF-8 text"),
    "dataset is a folder": (["{model}", "--dataset", "{folder}"], "is not a file"),
    "bits zero": (["{model}", "--bits", "0"], "--bits 0 is out of range"),
    "bits seventeen": (["{model}", "--bits", "17"], "--bits 17 is out of range"),
    "batch size zero": (["{model}", "--batch-size", "0"], "--batch-size must be at least 1"),
    "top-k zero": (["{model}", "--top-k", "0"], "--top-k must be at least 1"),
    "windows unknown": (["{model}", "--windows", "middle"], "--windows must be"),
    "unwritable output": (["{model}", "--output", "{blocker}/run"], "cannot be written"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(case, capsys, tmp_path, tiny_llama_dir, text_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    args, message = BAD[case]
    files = bad_files(tmp_path, tiny_llama_dir)
    args = [a.format(model=tiny_llama_dir, empty=empty, short=short, folder=tmp_path, **files) for a in args]
    if "--dataset" not in args:
        args += ["--dataset", str(text_file)]
    out = tmp_path / "out"
    if "--output" not in args:
        args += ["--output", str(out)]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, stderr = run_cli(capsys, "profile", *args)
    assert code == 2, (stdout, stderr)
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr + stdout
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind


def bad_files(tmp: Path, model_dir: Path) -> dict[str, Path]:
    """Broken inputs made on the spot: damaged GGUFs, a model folder without tokenizer, ..."""
    import shutil

    from transformers import AutoTokenizer, ViTConfig

    made = {"corrupt_gguf": tmp / "corrupt.gguf", "truncated_gguf": tmp / "truncated.gguf",
            "no_tokenizer": tmp / "no-tokenizer", "vit": tmp / "vit", "binary": tmp / "binary.txt",
            "latin1": tmp / "latin1.txt", "blocker": tmp / "blocker"}
    made["corrupt_gguf"].write_bytes(b"this is not a gguf file" * 10)
    made["truncated_gguf"].write_bytes(b"GGUF\x03\x00\x00\x00\x10")
    made["no_tokenizer"].mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, made["no_tokenizer"] / name)
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=64).save_pretrained(made["vit"])
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(made["vit"])
    made["binary"].write_bytes(bytes(range(256)) * 4)
    made["latin1"].write_bytes("café au lait, crème brûlée ".encode("latin-1") * 50)
    made["blocker"].write_text("a file where a folder should be")
    return made


def test_existing_output_is_refused_before_any_work(capsys, tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = run_cli(capsys, "profile", str(tiny_llama_dir), "-d", str(text_file), "-o", str(out))
    assert code == 2 and "holds files kernelscope did not write (keep.txt)" in stderr
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("args, message", [
    (["profile", "./nowhere"], "model not found"),
    (["profile", "demo", "--bits", "17"], "--bits 17 is out of range"),
])
def test_real_process_exit_code_and_stderr(args, message):
    proc = subprocess.run([sys.executable, "-m", "kernelscope", *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_eval_end_to_end(capsys, tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "ev"
    calib = tmp_path / "calib.txt"
    calib.write_text(text_file.read_text()[::-1])
    code, stdout, stderr = run_cli(
        capsys, "eval", str(tiny_llama_dir), "-d", str(text_file), "-n", "2", "-s", "64",
        "--scheme", "fp", "--scheme", "w8a8-per-token", "--scheme", "w8a8-crossquant", "--scheme",
        "w4a8-g128-per-token", "--scheme", "w8a8-smoothquant", "--scheme", "remove-kernel-crossquant",
        "--calib-dataset", str(calib), "--calib-nsamples", "2", "-o", str(out))
    assert code == 0, stderr
    assert "Perplexity" in stdout and "w8a8-smoothquant" in stdout
    body = json.loads((out / "summary.json").read_text())
    assert body["kind"] == "eval" and body["schema_version"] == SCHEMA_VERSION
    assert [r["scheme"] for r in body["results"]][:3] == ["fp", "w8a8-per-token", "w8a8-crossquant"]
    for r in body["results"]:
        assert {"scheme", "perplexity", "tokens", "windows"} <= set(r) and r["tokens"] == 2 * 63
    assert "WikiText-2 protocol" in body["protocol"]
    table = pl.read_parquet(out / "eval.parquet")
    assert table.height == 6 and table["perplexity"].is_finite().all()


def test_threshold_and_sweep_end_to_end(capsys, tmp_path, tiny_llama_dir, text_file):
    code, stdout, stderr = run_cli(capsys, "threshold", str(tiny_llama_dir), "-d", str(text_file), "-n", "2",
                                   "-s", "64", "--steps", "2", "--json")
    assert code == 0, stderr
    body = json.loads(stdout)
    assert body["kind"] == "threshold" and len(body["searches"]) == 1
    assert len(body["searches"][0]["verdicts"]) == 4 and body["searches"][0]["curve"]
    out = tmp_path / "sw"
    report = tmp_path / "sweep.html"
    code, stdout, stderr = run_cli(capsys, "sweep", str(tiny_llama_dir), "-d", str(text_file), "-n", "2",
                                   "-s", "64", "--alpha", "0.15,0.5", "--alpha", "1", "-o", str(out),
                                   "--report", str(report))
    assert code == 0, stderr
    assert "CrossQuant α sweep" in report.read_text(encoding="utf-8")
    code, stdout, stderr = run_cli(capsys, "threshold", str(tiny_llama_dir), "-d", str(text_file), "-n", "2",
                                   "-s", "64", "--steps", "1", "--report", str(tmp_path / "t.html"))
    assert code == 0, stderr  # a report without --output: built from the result in memory
    # plotly.js embedded (0.66 MB packed)
    assert "Remove-kernel" in stdout and (tmp_path / "t.html").stat().st_size > 650_000
    table = pl.read_parquet(out / "sweep.parquet")
    assert table["alpha"].to_list() == [None, 0.15, 0.5, 1.0]
    assert json.loads((out / "summary.json").read_text())["kind"] == "sweep"


BAD_RUNS = {
    "unknown scheme": (["eval", "{model}", "--scheme", "w8a8-per-row"], "unknown scheme 'w8a8-per-row'"),
    "duplicate scheme": (["eval", "{model}", "--scheme", "fp", "--scheme", "fp"], "given twice"),
    "eval alpha": (["eval", "{model}", "--scheme", "w8a8-crossquant", "--alpha", "2"],
                   "--alpha 2 is out of range"),
    "eval bits": (["eval", "{model}", "--scheme", "remove-kernel-per-token", "--bits", "1"],
                  "--bits 1 is out of range"),
    "group without weights": (["eval", "{model}", "--scheme", "remove-kernel-per-token", "--group-size",
                               "128"], "give --weight-bits too"),
    "smoothquant calibration offline": (["eval", "{model}", "--scheme", "w8a8-smoothquant", "-n", "1",
                                         "-s", "64"], "needs the Hugging Face hub"),
    "tolerance zero": (["threshold", "{model}", "--tolerance", "0"], "--tolerance must be a positive number"),
    "tolerance negative": (["threshold", "{model}", "--tolerance", "-0.01"],
                           "--tolerance must be a positive number"),
    "too few windows": (["threshold", "{model}", "-n", "1", "-s", "64"], "too few windows"),
    "unknown family": (["threshold", "{model}", "--family", "per-row"], "unknown --family"),
    "sweep alpha above one": (["sweep", "{model}", "--alpha", "0.15,1.5"], "--alpha 1.5 is out of range"),
    "sweep alpha negative": (["sweep", "{model}", "--alpha", "-0.2"], "--alpha -0.2 is out of range"),
    "sweep alpha not a number": (["sweep", "{model}", "--alpha", "0.1,x"], "--alpha 'x' is not a number"),
    "sweep alpha nan": (["sweep", "{model}", "--alpha", "nan"], "--alpha nan is out of range"),
    "group size zero": (["eval", "{model}", "--scheme", "w4a8-g0-per-token"],
                        "group size gG must be at least 1"),
    "weight bits nine": (["eval", "{model}", "--scheme", "remove-kernel-per-token", "--weight-bits", "9"],
                         "--weight-bits 9 is out of range"),
    "lm_head without the flag": (["threshold", "{model}", "--layers", "lm_head", "-s", "32"],
                                 "--include-lm-head"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_bad_eval_threshold_sweep_input(case, capsys, tmp_path, tiny_llama_dir, text_file):
    args, message = BAD_RUNS[case]
    args = [a.format(model=tiny_llama_dir) for a in args] + ["--dataset", str(text_file)]
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, *args, "--output", str(out))
    assert code == 2, (stdout, stderr)
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr + stdout
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_interrupted_profile_resumes_to_the_same_result(capsys, tmp_path, tiny_llama_dir, text_file):
    import signal
    import time

    common = ["profile", str(tiny_llama_dir), "-d", str(text_file), "-n", "400", "-s", "32", "--quiet"]
    code, _, stderr = run_cli(capsys, *common, "-o", str(tmp_path / "full"))
    assert code == 0, stderr

    part = tmp_path / "part"
    checkpoint = tmp_path / ".part.checkpoint"
    proc = subprocess.Popen([sys.executable, "-m", "kernelscope", *common, "-o", str(part)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 2.0  # stops within a second or two
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert not part.exists() and checkpoint.is_file()

    code, _, stderr = run_cli(capsys, *common, "-o", str(part), "--resume")
    assert code == 0, stderr
    assert not checkpoint.exists()
    summary = json.loads((part / "summary.json").read_text())
    assert 0 < summary["resumed_from_window"] < 400
    assert (part / "layers.parquet").read_bytes() == (tmp_path / "full" / "layers.parquet").read_bytes()


def test_resume_refuses_what_it_cannot_continue(capsys, tmp_path, tiny_llama_dir, text_file):
    from kernelscope.runs.checkpoint import checkpoint_path, save_checkpoint

    args = ["profile", str(tiny_llama_dir), "-d", str(text_file), "-n", "2", "-s", "32"]
    code, _, stderr = run_cli(capsys, *args, "--resume")
    assert code == 2 and "--resume needs --output" in stderr
    code, _, stderr = run_cli(capsys, *args, "-o", str(tmp_path / "run"), "--resume")
    assert code == 2 and "nothing to resume" in stderr
    save_checkpoint(checkpoint_path(tmp_path / "run"), {"windows": "another"}, 1, {})
    code, _, stderr = run_cli(capsys, *args, "-o", str(tmp_path / "run"), "--resume")
    assert code == 2 and "belongs to a different run" in stderr and len(stderr.strip().splitlines()) == 1
    checkpoint_path(tmp_path / "run").write_bytes(b"not a checkpoint")
    code, _, stderr = run_cli(capsys, *args, "-o", str(tmp_path / "run"), "--resume")
    assert code == 2 and "is damaged" in stderr
    assert not (tmp_path / "run").exists()


def test_interrupted_eval_stops_cleanly_and_writes_nothing(tmp_path, tiny_llama_dir, text_file):
    import signal
    import time

    out = tmp_path / "ev"
    # pydoc's whole text (-n all: about 6,700 windows of 32 tokens) keeps it busy far longer than the wait
    proc = subprocess.Popen([sys.executable, "-m", "kernelscope", "eval", str(tiny_llama_dir), "-d", "pydoc",
                             "-n", "all", "-s", "32", "--scheme", "fp", "--scheme", "w8a8-crossquant",
                             "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)  # imports, model load, and part of the evaluation
    assert proc.poll() is None, "the evaluation ended before it could be interrupted"
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 2.0
    assert proc.returncode == 130 and "nothing was written" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_trust_remote_code_is_off_unless_asked(monkeypatch, tiny_llama_dir):
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    from kernelscope.models import load_model

    load_model(str(tiny_llama_dir))
    load_model(str(tiny_llama_dir), trust_remote_code=True)
    assert seen == [False, True]


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    import torch

    from kernelscope.errors import KernelscopeError
    from kernelscope.runs.checkpoint import load_checkpoint

    path = tmp_path / ".run.checkpoint"
    torch.save({"version": 1, "fingerprint": {}, "done": 1, "state": _Exploit()}, path)
    with pytest.raises(KernelscopeError, match="damaged"):
        load_checkpoint(path, {})
    assert "this must never run" not in capsys.readouterr().out
