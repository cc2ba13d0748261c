"""llm-compressor's own ``oneshot`` against kernelscope's targets, window by window, on the demo model.

llm-compressor 0.14.0.1 pins transformers <= 5.17 and compressed-tensors 0.19.0, so it runs in an
environment of its own; this script has three steps, two in kernelscope's environment and one in that one:

    python benchmarks/llmcompressor_oneshot.py export --dir /tmp/llmc-check          # kernelscope's side
    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    /tmp/llmc/bin/python benchmarks/llmcompressor_oneshot.py oneshot --dir /tmp/llmc-check
    python benchmarks/llmcompressor_oneshot.py compare --dir /tmp/llmc-check

``export`` writes the demo model as a plain transformers folder (its weights, already dequantized from
the GGUF file, bit for bit), the 2 x 1024 WikiText-2 test windows and 8 x 1024 calibration windows that
``benchmarks/targets.py`` uses, and kernelscope's per-window NLL of each preset. ``oneshot`` quantizes the
model with llm-compressor (``QuantizationModifier(scheme=NAME, targets="Linear", ignore=["lm_head"])``,
calibrated on the same windows in their order) and evaluates it the same way. ``compare`` prints both.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

PRESETS = ("W8A8", "FP8_DYNAMIC", "FP8", "NVFP4", "NVFP4A16")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def window_nll(model, tokens: torch.Tensor) -> list[float]:
    """Each window's mean next-token NLL, as kernelscope's evaluation computes it."""
    out = []
    with torch.no_grad():
        for t in tokens:
            logits = model(input_ids=t[None], use_cache=False).logits
            nll = F.cross_entropy(logits[0, :-1].float(), t[1:], reduction="none")
            out.append(float(nll.double().sum()) / (len(t) - 1))
    return out


def export(folder: Path) -> None:
    import kernelscope as ks
    from kernelscope.runs.evaluate import evaluate
    from kernelscope.runs.schemes import parse_scheme

    loaded = ks.load_model("demo", dtype="float32", device="cpu")
    text = ks.load_text(str(DATA / "wikitext-2-raw" / "test.txt"))
    windows = ks.make_windows(ks.tokenize(loaded.tokenizer, text.text), 1024, 2)
    calib_text = ks.load_text(str(DATA / "wikitext-2" / "wiki.valid.tokens"), max_chars=20 * 8 * 1024)
    calibration = ks.make_windows(ks.tokenize(loaded.tokenizer, calib_text.text), 1024, 8, selection="random",
                                  seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"test": windows.tokens, "calibration": calibration.tokens}, folder / "windows.pt")
    result = evaluate(loaded, windows, [parse_scheme(f"llm-compressor:{n}") for n in PRESETS],
                      calibration=calibration)
    nll = {n: list(r["window_nll"]) for n, r in zip(PRESETS, result.table.iter_rows(named=True), strict=True)}
    (folder / "kernelscope.json").write_text(json.dumps(nll, indent=1))
    model = loaded.model  # the GGUF marks make it unsavable; its weights are plain float32 already
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder / "model")
    loaded.tokenizer.save_pretrained(folder / "model")


def oneshot(folder: Path, names: list[str]) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot as run
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    w = torch.load(folder / "windows.pt")
    out = {}
    for name in names:
        model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder / "model")
        data = Dataset.from_dict({"input_ids": [t.tolist() for t in w["calibration"]]})
        recipe = QuantizationModifier(scheme=name, targets="Linear", ignore=["lm_head"])
        model = run(model=model, tokenizer=tokenizer, recipe=recipe, dataset=data,
                    num_calibration_samples=len(w["calibration"]), max_seq_length=w["calibration"].shape[1],
                    shuffle_calibration_samples=False)
        out[name] = window_nll(model.eval(), w["test"])
    (folder / "llmcompressor.json").write_text(json.dumps(out, indent=1))


def compare(folder: Path) -> None:
    ours = json.loads((folder / "kernelscope.json").read_text())
    theirs = json.loads((folder / "llmcompressor.json").read_text())
    print("| preset | kernelscope | llm-compressor oneshot | windows equal to the bit |")
    print("|---|---|---|---|")
    for name in PRESETS:
        if name in theirs:
            a, b = ours[name], theirs[name]
            ppl = [math.exp(sum(v) / len(v)) for v in (a, b)]
            print(f"| {name} | {ppl[0]:.6f} | {ppl[1]:.6f} | {'yes' if a == b else 'no'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("export", "oneshot", "compare"))
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--presets", default=",".join(PRESETS))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.step == "export":
        export(args.dir)
    elif args.step == "oneshot":
        oneshot(args.dir, [n for n in args.presets.split(",") if n])
    else:
        compare(args.dir)


if __name__ == "__main__":
    main()
