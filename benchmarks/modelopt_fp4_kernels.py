"""ModelOpt's FP4 targets against ModelOpt's GPU kernels, on a real model.

    python benchmarks/modelopt_fp4_kernels.py
    python benchmarks/modelopt_fp4_kernels.py --out docs/benchmarks/modelopt-fp4-kernels-demo.txt

``modelopt:NVFP4_DEFAULT_CFG`` and ``modelopt:MXFP4_DEFAULT_CFG`` compute ModelOpt's pure-torch quantizers
(``NVFP4QTensor``, ``MXFP4QTensor``: what its checkpoint export writes). ``mtq.quantize``'s own model runs
CUDA kernels instead, which this machine cannot run; here they are written out from the rules of their
source, as read in nvidia-modelopt 0.47.0 (float32 division correctly rounded, casts to nearest even):

- NVFP4, the Triton kernel of GPUs of compute capability 8.9 and above (``fp4_fake_quant_block``): the
  E4M3 block scale ``e4m3(min(bmax / (6·s2), 448))·s2`` is not clamped below, and a block whose scale is
  under 1e-5 is taken with scale 1 (so it rounds to zero);
- MXFP4, the CUDA extension (``fused_amax_convert``, ``compute_scale_e8m0_NV``): the exponent is the exact
  ceiling of ``log2(bmax / 6)`` (bmax / 6 in float32), clamped to ±127, and E2M1 ties round to even.

For each: how many weight elements the two arithmetics give differently, how many of them differ in
being zero, and the perplexity with every Linear but lm_head quantized with the GPU kernels' rules on
neither, the weights, the activations or both (activation amax calibrated as ``benchmarks/targets.py``
does). It also checks kernelscope's own ``mxfp4_rceil``
format against the MX kernel's rules, element for element, on the same weights.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.targets import demo_arguments, demo_windows  # noqa: E402
from kernelscope.quant import formats, targets  # noqa: E402
from kernelscope.runs.evaluate import evaluate  # noqa: E402
from kernelscope.runs.schemes import parse_scheme  # noqa: E402

NAMES = ("modelopt:NVFP4_DEFAULT_CFG", "modelopt:MXFP4_DEFAULT_CFG")


def triton_nvfp4(x: torch.Tensor, amax: torch.Tensor, args: targets.Args,
                 kernel_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 by the rules of ModelOpt's Triton fake-quantization kernel."""
    g = args.group_size
    blocks = x.unflatten(-1, (x.shape[-1] // g, g)).float()  # (..., I/g, g)
    second = amax.float() / (6.0 * 448.0)
    second = torch.where(second > 0, second, torch.tensor(1e-12))
    ratio = blocks.abs().amax(dim=-1, keepdim=True) / (6.0 * second)  # (..., I/g, 1)
    step = torch.clamp(ratio, max=448.0).to(torch.float8_e4m3fn).float() * second
    step = torch.where(step >= 1e-5, step, torch.ones_like(step))
    scaled = blocks / step
    q = targets._e2m1_magnitude(scaled, ties_to_even=True).copysign(scaled)
    return (q * step).flatten(-2).to(x.dtype), targets.in_kernel(scaled, args, kernel_scale).flatten(-2)


def cuda_mxfp4(x: torch.Tensor, amax: torch.Tensor | None, args: targets.Args,
               kernel_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 by the rules of ModelOpt's CUDA extension (``amax`` unused, as there)."""
    g = args.group_size
    blocks = x.unflatten(-1, (x.shape[-1] // g, g)).float()  # (..., I/g, g)
    ratio = blocks.abs().amax(dim=-1, keepdim=True) / 6.0  # (..., I/g, 1)
    mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa · 2^exponent, mantissa in [0.5, 1)
    ceiling = torch.where(mantissa == 0.5, exponent - 1, exponent).clamp(-127, 127).float()
    ceiling = torch.where(ratio == 0, torch.zeros_like(ceiling), ceiling)
    scaled = blocks * torch.exp2(-ceiling)
    q = targets._e2m1_magnitude(scaled, ties_to_even=True).copysign(scaled)
    return (q * torch.exp2(ceiling)).flatten(-2).to(x.dtype), \
        targets.in_kernel(scaled, args, kernel_scale).flatten(-2)


KERNELS = {"modelopt:NVFP4_DEFAULT_CFG": ("_modelopt_nvfp4", triton_nvfp4),
           "modelopt:MXFP4_DEFAULT_CFG": ("_modelopt_mxfp4", cuda_mxfp4)}
"""Each target -> the function of kernelscope's that computes it, and the GPU kernel's rules."""


def weight_rows(model: torch.nn.Module) -> list[str]:
    """Per target: the weight elements the two arithmetics give differently, and in being zero."""
    weights = [m.weight.data for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    total = sum(w.numel() for w in weights)
    rows = []
    for name, (_, kernel) in KERNELS.items():
        args = targets.get_target(name).weights
        values = zeros = 0
        for w in weights:
            ours, our_zero = targets.quantize_weight(w, args)
            theirs, their_zero = kernel(w, w.abs().amax(), args)
            values += int((ours != theirs).sum())
            zeros += int((our_zero != their_zero).sum())
        rows.append(f"| {name} | {total} | {values} ({values / total:.3%}) | {zeros} |")
    rceil = formats.get_format("mxfp4_rceil")
    mx = targets.get_target("modelopt:MXFP4_DEFAULT_CFG").weights
    apart = sum(int((formats.fake_quantize(w, rceil) != cuda_mxfp4(w, None, mx)[0]).sum()) for w in weights)
    rows.append(f"\nkernelscope's mxfp4_rceil against the MX kernel's rules: {apart} of {total} weight "
                "elements differ")
    return rows


ROLES = {"neither": (), "weights": (True,), "activations": (False,), "both": (True, False)}
"""Which quantizers take the GPU kernels' rules: weights (static), activations, both."""


def _on(kernel, pure, weights: tuple[bool, ...]):
    """``kernel`` for the quantizers ``weights`` names (True: a weight's), ``pure`` for the others."""
    def quantize(x, amax, args, kernel_scale=1.0):
        chosen = kernel if (args.scaling is targets.Scaling.STATIC) in weights else pure
        return chosen(x, amax, args, kernel_scale)
    return quantize


def perplexities(loaded, windows, calibration) -> dict[str, dict[str, float]]:
    """Per target, the perplexity with the GPU kernels' rules on neither, the weights, the
    activations, or both."""
    schemes = [parse_scheme(n) for n in NAMES]
    own = {attr: getattr(targets, attr) for attr, _ in KERNELS.values()}
    out: dict[str, dict[str, float]] = {n: {} for n in NAMES}
    try:
        for role, weights in ROLES.items():
            for attr, kernel in KERNELS.values():
                setattr(targets, attr, _on(kernel, own[attr], weights))
            table = evaluate(loaded, windows, schemes, calibration=calibration).table
            for i, n in enumerate(NAMES):
                out[n][role] = table["perplexity"][i]
    finally:
        for attr, function in own.items():
            setattr(targets, attr, function)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    demo_arguments(ap)
    args = ap.parse_args()

    loaded, windows, calibration = demo_windows(args)
    where = str(args.dataset).replace(str(ROOT.parent), "..")
    lines = [(f"model {args.model}, {args.nsamples} x {args.seqlen} windows of {where}; calibration "
              f"{args.calib_nsamples} x {args.seqlen} random windows of the calibration text"),
             f"torch {torch.__version__}, {platform.machine()}", "",
             "| target | weight elements | differing values | differing in the kernel |", "|---|---|---|---|",
             *weight_rows(loaded.model), "",
             "perplexity, the GPU kernels' rules on the quantizers named, the pure-torch ones elsewhere:",
             "",
             "| target | neither (the target) | weights | activations | both |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join([n, *(f"{p[r]:.4f}" for r in ROLES)]) + " |"
              for n, p in perplexities(loaded, windows, calibration).items()]
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out is not None:
        args.out.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
