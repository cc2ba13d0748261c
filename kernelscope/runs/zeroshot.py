"""``zeroshot``: accuracy on lm-evaluation-harness tasks under each scheme, from one model load.

For each scheme the scheme is put in force on the in-memory model (hooks on the selected Linear
layers, as in ``evaluate``) and the harness scores every task on it through its ``HFLM`` wrapper,
which is handed the model and a copy of its tokenizer, so nothing is fetched. Each (scheme, task) is
scored as the harness scores that task alone: its four seeds set first (random 0, numpy, torch and
few-shot 1234, the harness's defaults, or ``seed`` for all four as its ``--seed N`` does), the few-shot
count set, the first ``limit`` documents.

The harness scores a request with one forward pass over context + continuation. At batch size 1
that pass is the request alone, so a scale a scheme takes over a sequence (CrossQuant's channel
maxima c_j, a per-tensor scale, NVFP4's tensor scale) is the request's own. In a larger batch the
harness right-pads the shorter requests and passes no attention mask: a causal model's real tokens
never attend to the padding, and per-token or per-block scales never see it, but a sequence-wide
scale would, so schemes with one run at batch size 1 only.
"""

from __future__ import annotations

import contextlib
import copy
import io
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from kernelscope.capture import ForwardHooks
from kernelscope.data import TextSource, Windows
from kernelscope.data.tasks import HarnessTasks
from kernelscope.errors import KernelscopeError
from kernelscope.models import LinearLayer, LoadedModel
from kernelscope.quant import targets
from kernelscope.quant.modes import Mode
from kernelscope.quant.transforms import IDENTITY, LayerTransform, TransformSpec
from kernelscope.results import write_run
from kernelscope.runs.common import (
    StageProgress,
    TableResult,
    resolve_layers,
    run_context,
    unpack,
)
from kernelscope.runs.evaluate import (
    calibrate_target,
    calibration_facts,
    scheme_layers,
    scheme_transform,
    transforms_facts,
)
from kernelscope.runs.fakequant import SchemeApplied
from kernelscope.runs.forward import eval_mode
from kernelscope.runs.schemes import Scheme
from kernelscope.runs.transforming import ModelTransform, TransformBinder, identity_transform

HARNESS_SEEDS = {"random": 0, "numpy": 1234, "torch": 1234, "fewshot": 1234}
"""lm-evaluation-harness's default seeds (its ``--seed 0,1234,1234,1234``)."""


def harness_seeds(seed: int | None) -> dict[str, int]:
    """The four seeds of a run: the harness's defaults, or ``seed`` for all four."""
    return dict(HARNESS_SEEDS) if seed is None else dict.fromkeys(HARNESS_SEEDS, seed)


def spans_tokens(scheme: Scheme) -> bool:
    """True when the scheme's activation scale of a token depends on the rest of its sequence (for a
    target: a dynamic per-tensor scale, which spans the whole batch)."""
    if scheme.target is not None:
        act = scheme.target.input_activations
        return act is not None and act.dynamic and act.strategy is targets.Strategy.TENSOR
    return scheme.activation is not None and scheme.activation.format.rule.spans_tokens


@contextlib.contextmanager
def applied_scheme(model: nn.Module, layers: list[LinearLayer], scheme: Scheme,
                   transforms: dict[str, LayerTransform] | None = None,
                   calibration: dict[str, targets.Calibration] | None = None) -> Iterator[SchemeApplied]:
    """``scheme`` in force on ``layers`` for every forward pass of ``model`` inside the block; every
    hook gone and every weight restored after, error or not.

    The harness's inputs vary in length from call to call, so no window length splits them: a
    Linear input is ``(B, T, I)``, and a flattened ``(T, I)`` one (OPT's fc1/fc2) is one sequence,
    exact at batch size 1 (the only size at which a sequence-wide scale is allowed).
    """
    applied = SchemeApplied(layers, scheme, transforms, seq_len=None, calibration=calibration)
    with applied, ForwardHooks() as hooks:
        hooks.post(model, lambda module, args, output: applied.end_batch())
        yield applied


@dataclass
class ZeroshotResult(TableResult):
    """One row per scheme x task x accuracy metric (``table``), one per scheme x task x document
    (``items``: each choice's log-likelihood and whether the item was answered right), and the
    JSON summary (``summary.json``)."""

    items: pl.DataFrame | None = None
    TABLE = "zeroshot"
    ITEMS = "zeroshot_items"

    def save(self, path: str | Path, *, overwrite: bool = False, **writing: Any) -> Path:
        """Write ``zeroshot.parquet``, ``zeroshot_items.parquet`` and ``summary.json``, atomically."""
        tables = {self.TABLE: self.table}
        if self.items is not None:
            tables[self.ITEMS] = self.items
        return write_run(path, tables, self.summary, overwrite=overwrite, **writing)


def _harness_model(net: nn.Module, tokenizer: Any, batch_size: int):
    """The harness's ``HFLM`` around the in-memory model, without its own progress bars (a run
    shows one per scheme)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

    return QuietHFLM(pretrained=net, tokenizer=tokenizer, batch_size=batch_size)


def _seed(seeds: dict[str, int]) -> None:
    """Seed the generators as the harness does before it evaluates."""
    random.seed(seeds["random"])
    np.random.seed(seeds["numpy"])
    torch.manual_seed(seeds["torch"])


def fewshot_count(own: int | None, num_fewshot: int | None) -> int:
    """The few-shot count the harness uses for a task whose definition says ``own``: a definition's 0
    stays 0, else ``num_fewshot`` when given, else the definition's count (0 when it has none)."""
    if own == 0 or num_fewshot is None:
        return own or 0
    return num_fewshot


def _score(lm, name: str, task, *, shots: int, limit: int | None,
           seeds: dict[str, int]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The harness's aggregate results and logged samples of one task, scored alone with ``shots``
    few-shot examples."""
    from lm_eval.evaluator import evaluate as harness_evaluate

    _seed(seeds)
    task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(seed=seeds["fewshot"])
    # The harness prints progress notes on stdout; they would break --json.
    # bootstrap_iters=0: no resampling for metrics not reported (lambada's perplexity); the
    # accuracies' standard errors are closed-form (see _rows).
    with contextlib.redirect_stdout(io.StringIO()):
        out = harness_evaluate(lm=lm, task_dict={"tasks": {name: task}, "groups": {}, "group_map": {}},
                               limit=limit, bootstrap_iters=0, log_samples=True)
    return out["results"][name], out["samples"][name]


def _rows(scheme: Scheme, name: str, metrics: list[str], results: dict[str, Any],
          samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per accuracy metric and filter: the harness's accuracy (the mean over items) and its
    standard error, the harness's own closed form (sample standard deviation / sqrt(n))."""
    from lm_eval.api.metrics import mean_stderr

    rows = []
    for key, value in results.items():
        metric, _, filter_key = key.partition(",")
        if metric not in metrics or not filter_key:
            continue
        values = [float(s[metric]) for s in samples if s["filter"] == filter_key]
        rows.append({
            **scheme.describe(), "task": name, "metric": metric, "filter": filter_key,
            "accuracy": float(value), "stderr": mean_stderr(values) if len(values) > 1 else None,
            "items": len(values),
        })
    return rows


def _items(scheme: Scheme, name: str, metrics: list[str], samples: list[dict[str, Any]]) -> list[dict]:
    """Each document's outcome: its choices' log-likelihoods, which were greedy, its accuracies."""
    out = []
    for s in samples:
        resps = [r for r in s["filtered_resps"] if isinstance(r, (tuple, list)) and len(r) == 2]
        out.append({
            "scheme": scheme.name, "task": name, "doc_id": int(s["doc_id"]), "filter": s["filter"],
            "target": str(s["target"]), "loglikelihoods": [float(r[0]) for r in resps],
            "greedy": [bool(r[1]) for r in resps], **{m: float(s[m]) for m in metrics if m in s},
        })
    return out


def _kernel(applied: SchemeApplied) -> tuple[int, int]:
    return (int(applied.kernel) if applied.kernel is not None else 0,
            int(applied.elements) if applied.elements is not None else 0)


def _run_scheme(lm, net: nn.Module, layers: list[LinearLayer], scheme: Scheme, tasks: HarnessTasks, *,
                transform: ModelTransform, stage: str, limit, num_fewshot, seeds, batch_size,
                progress, calibration=None) -> tuple[list, list]:
    rows, items = [], []
    total = len(tasks.tasks)
    if progress is not None:
        progress(stage, 0, total)
    with applied_scheme(net, layers, scheme, transform.layers, calibration) as applied:
        for done, (name, task) in enumerate(tasks.tasks.items(), start=1):
            started, (kernel0, elements0) = time.perf_counter(), _kernel(applied)
            count = fewshot_count(tasks.fact(name)["config_num_fewshot"], num_fewshot)
            results, samples = _score(lm, name, task, shots=count, limit=limit, seeds=seeds)
            kernel, elements = (a - b for a, b in zip(_kernel(applied), (kernel0, elements0), strict=True))
            # a batch's padding would count
            counted = scheme.mode.quantizes and batch_size == 1 and elements > 0
            seconds = round(time.perf_counter() - started, 3)
            rows.extend(row | transform.describe() | {
                            "num_fewshot": count, "kernel_elements": kernel if counted else None,
                            "elements": elements if counted else None,
                            "kernel_fraction": kernel / elements if counted else None,
                            "seconds": seconds}
                        for row in _rows(scheme, name, tasks.metrics(name), results, samples))
            items.extend(item | {"transform": transform.label}
                         for item in _items(scheme, name, tasks.metrics(name), samples))
            if progress is not None:
                progress(stage, done, total)
    return rows, items


def _run_pairs(lm, net: nn.Module, tasks: HarnessTasks, pairs: Sequence[tuple[Scheme, TransformSpec]],
               covers: dict[str, list[LinearLayer]], binder: TransformBinder, selected: list[LinearLayer],
               calibration: Windows | None, *, labelled: bool, limit: int | None, num_fewshot: int | None,
               seeds: dict[str, int], batch_size: int, progress: StageProgress | None,
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Every task scored under each (scheme, transform) in order, a target's static scales calibrated
    first: the rows, the items, and the static scales by stage."""
    rows: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    static_scales: dict[str, Any] = {}
    for scheme, spec in pairs:
        bound = identity_transform(selected) if spec.is_identity else binder.bind(spec)
        stage = f"{scheme.name}, {spec.label}" if labelled else scheme.name
        scales, facts = calibrate_target(net, scheme, covers[scheme.name], bound, calibration)
        if facts:
            static_scales[stage] = facts
        scheme_rows, scheme_items = _run_scheme(
            lm, net, covers[scheme.name], scheme, tasks, transform=bound, stage=stage, limit=limit,
            num_fewshot=num_fewshot, seeds=seeds, batch_size=batch_size, progress=progress,
            calibration=scales)
        rows += scheme_rows
        items += scheme_items
    return rows, items, static_scales


def _with_change_from_fp(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's accuracy minus the fp row's of the same task, metric and filter (None without fp; the
    fp row without a transform where there is one)."""
    fp: dict[tuple, float] = {}
    for r in sorted((r for r in rows if r["mode"] == Mode.FP),
                    key=lambda r: r["transform"] != IDENTITY.label):
        fp.setdefault((r["task"], r["metric"], r["filter"]), r["accuracy"])
    return [r | {"change_from_fp": None
                 if r["mode"] == Mode.FP or (r["task"], r["metric"], r["filter"]) not in fp
                 else r["accuracy"] - fp[(r["task"], r["metric"], r["filter"])]} for r in rows]


def protocol_text(tasks: HarnessTasks, limit: int | None, num_fewshot: int | None, batch_size: int,
                  seeds: dict[str, int]) -> str:
    count = "each task's own few-shot count" if num_fewshot is None else f"{num_fewshot}-shot"
    docs = "every document" if limit is None else f"the first {limit} documents"
    return (f"lm-evaluation-harness {tasks.harness_version} (HFLM on the in-memory model, its tokenizer "
            f"passed): {docs} of each task, {count}, batch size {batch_size}, seeds "
            f"{','.join(str(v) for v in seeds.values())} (random, numpy, torch, few-shot); "
            "acc = share of items whose right answer has the highest log-likelihood (acc_norm: per character "
            "of the answer), ± its standard error (sample standard deviation / sqrt(n))")


def zeroshot(
    model: nn.Module | LoadedModel,
    tasks: HarnessTasks,
    schemes: Sequence[Scheme],
    *,
    tokenizer: Any = None,
    layers: str | Sequence[LinearLayer] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    seed: int | None = None,
    transforms: Sequence[TransformSpec] = (IDENTITY,),
    calibration: Windows | None = None,
    calibration_text: TextSource | None = None,
    progress: StageProgress | None = None,
) -> ZeroshotResult:
    """Accuracy of ``model`` on ``tasks`` (from :func:`kernelscope.data.tasks.load_tasks`) under each
    scheme and each transform, in order. ``tokenizer`` is needed for a bare module (a loaded model
    brings its own).

    The selected Linear layers (default: every Linear in the decoder blocks; ``lm_head`` stays in
    full precision) are treated as each scheme says, in the basis of each transform (the scheme's
    own first, as :func:`~kernelscope.runs.evaluate.evaluate` does); calibrated transforms
    (SmoothQuant) need ``calibration`` windows. The model is left as it was found: hooks removed,
    weights and training flag restored.
    """
    net, info, own_tokenizer = unpack(model)
    tokenizer = tokenizer if tokenizer is not None else own_tokenizer
    pairs = [(scheme, scheme_transform(scheme, t)) for scheme in schemes for t in transforms]
    _check(schemes, tasks, tokenizer, num_fewshot, batch_size, calibration, [spec for _, spec in pairs])
    selected = resolve_layers(net, layers)
    seeds = harness_seeds(seed)
    binder = TransformBinder(net, selected, calibration, batch_size=1)
    covers = scheme_layers(net, schemes, selected, [], transforms)
    with eval_mode(net):
        # the harness may set a missing pad token on the tokenizer it is given: give it a copy
        lm = _harness_model(net, copy.deepcopy(tokenizer), batch_size)
        rows, items, static_scales = _run_pairs(
            lm, net, tasks, pairs, covers, binder, selected, calibration, labelled=len(transforms) > 1,
            limit=limit, num_fewshot=num_fewshot, seeds=seeds, batch_size=batch_size, progress=progress)
    rows = _with_change_from_fp(rows)
    summary = {
        **run_context(info, None, None, "zeroshot"),
        "protocol": protocol_text(tasks, limit, num_fewshot, batch_size, seeds),
        "tasks": tasks.facts,
        "results": rows,
        "layers": {"count": len(selected), "pattern": layers if isinstance(layers, str) else None,
                   "lm_head": "full precision"},
        "transforms": transforms_facts(transforms),
        "calibration": calibration_facts(calibration, calibration_text,
                                         binder.calibrated or bool(static_scales)),
        "static_scales": static_scales or None,
        "settings": {"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size, "seeds": seeds,
                     "include_path": tasks.include_path, "harness": "lm-evaluation-harness",
                     "harness_version": tasks.harness_version},
    }
    summary["versions"]["lm_eval"] = tasks.harness_version
    return ZeroshotResult(pl.DataFrame(rows, infer_schema_length=None), summary,
                          pl.DataFrame(items, infer_schema_length=None))


def _check(schemes: Sequence[Scheme], tasks: HarnessTasks, tokenizer: Any, num_fewshot: int | None,
           batch_size: int, calibration: Windows | None, specs: Sequence[TransformSpec]) -> None:
    if not schemes:
        raise ValueError("zeroshot needs at least one scheme")
    if tokenizer is None:
        raise ValueError("zeroshot needs the model's tokenizer (pass tokenizer=, or a loaded model)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    wide = [s.name for s in schemes if spans_tokens(s)]
    if batch_size > 1 and wide:
        raise KernelscopeError(f"scheme {wide[0]} takes its scale over a whole sequence, and in a batch the "
                               "harness pads the shorter requests: it runs at batch size 1 only")
    fixed = tasks.fixed_zero_shot
    if num_fewshot not in (None, 0) and fixed:
        raise KernelscopeError(f"task{'s' * (len(fixed) > 1)} {', '.join(fixed)} "
                               f"fix{'es its' if len(fixed) == 1 else ' their'} few-shot count at 0 in "
                               f"{'its definition' if len(fixed) == 1 else 'their definitions'}, which the "
                               "harness keeps over any other")
    if any(spec.needs_calibration for spec in specs) and calibration is None:
        raise ValueError("calibrated transforms (SmoothQuant) need calibration windows")
