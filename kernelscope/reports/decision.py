"""The report's decision, in words and values: which runs say what, where a kernel lies against the
thresholds located for its family, which deploy candidate to deploy and why each other ranks behind it,
how it deploys, what was not evaluated that might beat it, and the commands that measure what is missing.

Every function here is pure over run summaries and tables, and returns plain data: strings, lists, small
dataclasses, and sentences as lists of pieces, a piece either words or :class:`Marked` words (a figure or
a name to notice, a command or option to type, an aside). None of it is HTML: :mod:`.html` escapes and
lays out what it gets, and the decision can be read and tested without a page (:func:`plain`).

The rules a candidate is ranked by, and the words of its ``deployable``, are those of
:mod:`~kernelscope.results.decision_rules`, the rules the advise run ranked its candidates by.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kernelscope.quant.formats import FULL_PRECISION_BITS, stored_bits
from kernelscope.quant.modes import Mode
from kernelscope.quant.targets import TARGETS
from kernelscope.quant.transforms import COMPOSE, NONE, TRANSFORMS
from kernelscope.reports import figures as F
from kernelscope.reports import numbers as N
from kernelscope.results import RunFolder
from kernelscope.results import decision_rules as rules

# -- sentences ----------------------------------------------------------------------------------------

STRONG, CODE, ASIDE = "strong", "code", "aside"
"""How :class:`Marked` words stand out: a figure or name to notice, what to type, a remark aside."""


@dataclass(frozen=True)
class Marked:
    """Words set apart in a sentence, ``mark`` saying how (:data:`STRONG`, :data:`CODE`, :data:`ASIDE`)."""

    text: str
    mark: str = STRONG


class Own(str):
    """The report's own words in a sentence, holding no markup and never a value from the runs: a page
    writes them as they are (an apostrophe as it is), where it escapes every other piece whole."""

    __slots__ = ()


Piece = str | Marked
"""A piece of a sentence: words (:class:`Own` where they are the report's alone), or :class:`Marked`
words."""


@dataclass(frozen=True)
class Paragraph:
    """The lead of a deployment decision: ``kind`` ``deploy`` (a candidate to deploy, or the plan) or
    ``failed`` (a warning that comes first), and its words."""

    kind: str
    words: list[Piece]


def plain(words: Sequence[Piece]) -> str:
    """A sentence as read, its marks dropped."""
    return "".join(w if isinstance(w, str) else w.text for w in words)


def joined(sentences: Sequence[Sequence[Piece]], separator: str) -> list[Piece]:
    """Sentences one after another, ``separator`` between each two."""
    out: list[Piece] = []
    for i, words in enumerate(sentences):
        out += ([separator] if i else []) + list(words)
    return out


def _options_marked(text: str) -> list[Piece]:
    """``text`` with each ``(-n)`` in it a command-line option to type."""
    out: list[Piece] = []
    for i, part in enumerate(text.split("(-n)")):
        out += (["(", Marked("-n", CODE), ")"] if i else []) + [part]
    return out


# -- the commands that measure what is missing ------------------------------------------------------

NEXT_COMMANDS = {
    "profile": ("-o", "runs/profile"),
    "threshold": ("-o", "runs/threshold"),
    "sweep": ("--alpha", "0.15,0.45,0.75,1", "-o", "runs/sweep"),
    "eval": ("--scheme", "fp,w8a8-per-token,w8a8-crossquant", "-o", "runs/eval"),
    "advise": ("--scheme", "w4a8-g128-per-token", "-o", "runs/advice"),
    "zeroshot": ("--scheme", "fp,w8a8-per-token", "--tasks", "arc_easy,piqa", "-o", "runs/zeroshot"),
}
"""What each command a section without data names adds to the runs' own model, text and windows."""
WINDOWED = ("profile", "eval", "threshold", "sweep", "advise")
"""The commands that read windows of a text (``--dataset``, ``--seqlen``, ``--nsamples``)."""
LEAST = {"threshold": (2, 2), "advise": (2, 2), "eval": (1, 2), "sweep": (1, 2)}
"""The fewest windows and tokens a window each command takes (a threshold search and advise resample
at least 2 windows; perplexity predicts every token of a window but the first)."""


def rerun_options(summary: dict, command: str) -> list[str]:
    """The arguments that give ``command`` a run's model, text and windows: the model and ``--dataset``
    as given, ``--seqlen`` and ``-n`` (raised to the least ``command`` takes), and ``--windows random`` with
    its ``--seed`` where the windows were drawn. What the summary does not record is left out (a run
    made through the Python API names no model: ``MODEL`` stands for it)."""
    model = summary.get("model") or {}
    args = [str(model.get("model") or model.get("path") or "MODEL")]
    if command not in WINDOWED:
        return args
    text, windows = summary.get("text") or {}, summary.get("windows") or {}
    least_windows, least_seqlen = LEAST.get(command, (1, 1))
    if text.get("source"):
        args += ["-d", str(text["source"])]
    if windows.get("seqlen"):
        args += ["-s", str(max(int(windows["seqlen"]), least_seqlen))]
    if windows.get("windows"):
        args += ["-n", str(max(int(windows["windows"]), least_windows))]
    if windows.get("selection") == "random":
        args += ["--windows", "random", "--seed", str(windows.get("seed") or 0)]
    return args


def rerun_command(summary: dict, command: str, *extra: str) -> str:
    """``kernelscope COMMAND`` on a run's model, text and windows (:func:`rerun_options`), then ``extra``:
    a command that runs as written, in a shell, and measures what the run measured."""
    return shlex.join(["kernelscope", command, *rerun_options(summary, command), *extra])


def source_of(summaries: Sequence[dict]) -> dict:
    """The summary whose model, text and windows a suggested command repeats: the first that records a
    text and windows, else the first."""
    first = summaries[0] if summaries else {}
    return next((s for s in summaries if s.get("text") and s.get("windows")), first)


def next_command(source: dict, command: str) -> str:
    """The command that fills a section without data, on ``source``'s model, text and windows."""
    return rerun_command(source, command, *NEXT_COMMANDS[command])


def suggested(source: dict, command: str) -> Marked:
    """:func:`next_command` as a command to type in a sentence."""
    return Marked(next_command(source, command), CODE)


# -- kernels against thresholds -----------------------------------------------------------------------

REFERENCE_THRESHOLDS = {"OPT": 0.19, "LLaMA": 0.01}
"""Kernel proportions below which the CrossQuant paper finds perplexity near-lossless, per family."""
FAMILIES = {"OPT": ("opt",), "LLaMA": ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma")}
"""Which model types (or architecture names' beginnings) each paper reference applies to."""
BRACKETED = "crossing bracketed"
"""The status of a threshold search that found the crossing between two measured points."""
SIDES = {"below": "below the threshold", "above": "above the threshold",
         "within": "within the interval of the threshold"}
"""Where a kernel lies against a threshold (:func:`side`), in words."""
NO_THRESHOLD = "no threshold measured for this family"
"""What a kernel of a family no threshold was located for is compared with: nothing."""


def family_of(model: dict) -> str | None:
    """The paper's family a run's model belongs to (LLaMA-like or OPT), or None."""
    name = str(model.get("model_type") or model.get("architecture") or "").lower()
    return next((fam for fam, prefixes in FAMILIES.items() if name.startswith(prefixes)), None)


def paper_reference(family: str | None) -> str | None:
    """``LLaMA 1%``: the CrossQuant paper's reference threshold for a family, shown beside a kernel and
    never as a verdict on it; None for a family the paper gives none for."""
    return None if family is None else f"{family} {100 * REFERENCE_THRESHOLDS[family]:g}%"


def measured_on(summary: dict) -> tuple:
    """What a run's figures depend on besides the model: the text, the windows and their length."""
    return ((summary.get("text") or {}).get("sha256"), (summary.get("windows") or {}).get("tokens_sha256"),
            (summary.get("windows") or {}).get("seqlen"))


def located_thresholds(thresholds) -> list[F.Threshold]:
    """The kernel thresholds the threshold runs located (their crossing bracketed), each with the
    quantizer family and basis it holds for and its 95% interval; the first run's where several
    located one for the same family and basis."""
    found: dict[tuple, F.Threshold] = {}
    for label, summary in thresholds:
        family = summary.get("family") or {}
        for search in F.searches_of(summary):
            if search.get("status") == BRACKETED and search.get("threshold_kernel_fraction") is not None:
                spread = search.get("crossing_uncertainty") or {}
                located = F.Threshold(
                    family, search.get("transform", NONE), search["threshold_kernel_fraction"],
                    spread.get("kernel_fraction_ci_low"), spread.get("kernel_fraction_ci_high"), label,
                    search, measured_on(summary))
                found.setdefault((family.get("label"), located.basis), located)
    return list(found.values())


def side(row: dict, threshold: F.Threshold) -> str:
    """Where a kernel lies against a threshold of its own family: ``below`` its interval, ``above`` it,
    or ``within`` it (undetermined by the search's windows)."""
    low = threshold.value if threshold.low is None else threshold.low
    high = threshold.value if threshold.high is None else threshold.high
    return "below" if row["kernel_fraction"] < low else "above" if row["kernel_fraction"] > high else "within"


@dataclass(frozen=True)
class Against:
    """A kernel against one threshold located for its family and basis: the :func:`side` it lies on and
    that in words, the threshold with its interval, and the run that located it (and whether on other
    text or windows than the kernel's)."""

    side: str
    words: str
    threshold: str
    source: str


def against(row: dict, thresholds: list[F.Threshold], run: dict | None = None) -> list[Against]:
    """A kernel against each threshold located for its own family and basis; none where no threshold
    holds for it (a kernel of another family or basis is not compared)."""
    said = []
    for t in (t for t in thresholds if t.applies_to(row)):
        where = side(row, t)
        other = "" if run is None or t.where == measured_on(run) else ", located on other text or windows"
        said.append(Against(where, SIDES[where], t.text(), t.run + other))
    return said


@dataclass(frozen=True)
class KernelVerdict:
    """What a threshold search says of one kernel of the model it counted: the kernel
    (``per_token int8 kernel 28.49%``) against the thresholds of its own family and basis (an empty list
    for a kernel of another family), or, with ``against`` None, the search's own words."""

    kernel: str = ""
    against: list[Against] | None = None
    words: str = ""


def search_verdicts(label: str, summary: dict, search: dict) -> list[KernelVerdict]:
    """What a threshold search says of the model's own kernels it counted: a kernel of the searched
    family against the threshold with its interval (or the search's own words where it located none),
    any other kernel not compared."""
    family, basis = summary.get("family") or {}, search.get("transform", NONE)
    kernels, words = search.get("actual_kernels") or [], search.get("verdicts") or []
    if len(kernels) != len(words):  # a run of an earlier version: its own words
        return [KernelVerdict(words=str(v)) for v in words]
    located = located_thresholds([(label, {**summary, "searches": [search]})])
    items = []
    for kernel, verdict in zip(kernels, words, strict=True):
        row = {"transform": basis, **kernel}
        head = f"{series(row)} kernel {N.share(kernel['kernel_fraction'])}"
        mine = [t for t in located if t.applies_to(row)]
        if not F.same_family(family, row):
            items.append(KernelVerdict(head, []))
        elif mine:
            items.append(KernelVerdict(head, against(row, mine)))
        else:
            items.append(KernelVerdict(words=str(verdict)))
    return items


# -- figures in words ---------------------------------------------------------------------------------

def series(row: dict) -> str:
    """A row's configuration, with its transform where that is not the identity."""
    return F.series_name(row["config"], row.get("transform", NONE))


def change(row: dict) -> str:
    """``+2.97% [+2.50%, +3.44%]``: a row's perplexity change from fp with its paired interval."""
    ci = N.interval(row.get("change_pct_ci_low"), row.get("change_pct_ci_high"), signed=True)
    return N.percent(row.get("change_pct"), signed=True) + (f" {ci}" if ci else "")


def weights(row: dict) -> str:
    """What a scheme does to the weights, in words: ``weights int4 g128``, ``weights mxfp4``, or empty
    for fp."""
    if row.get("weight_format"):
        return f"weights {row['weight_format']}"
    if row.get("weight_bits"):
        group = f" g{row['group_size']}" if row.get("group_size") else " per output channel"
        return f"weights int{row['weight_bits']}{group}"
    return ""


def kernel_share(share: float | None, low: float | None, high: float | None) -> str:
    """The share of a loss that removing the kernel alone causes, with its 95% interval, and "not
    separable" where the interval holds 0 (the windows cannot tell the kernel's part from none)."""
    if share is None:
        return ""
    spread = N.interval(low, high, N.share)
    text = N.share(share) + (f" {spread}" if spread else "")
    return text + (", not separable from 0" if spread and low <= 0 <= high else "")


def fake_quantized(row: dict) -> bool:
    """An evaluation row of a scheme one could deploy: fake quantization, not a diagnostic pass
    (remove-kernel) or a reference."""
    return row.get("mode") == Mode.FAKE_QUANT


# -- the deploy candidates of an advise run -----------------------------------------------------------

SHOWN_RUNNERS_UP = 2
"""How many runners-up the first screen names, one line each (the candidates table holds them all)."""
SHOWN_UNTRIED = 6
"""How many deployment targets with fewer bits the first screen names before counting the rest."""
DEPLOYED = rules.DEPLOYED
"""A candidate's ``deployable`` in words."""


def brief(how: object) -> str:
    """A candidate's ``deploy_with`` up to its first explanation (``ModelOpt, whose arithmetic differs
    below the format``); the candidates table holds it whole."""
    return str(how or "").split(": ", 1)[0]


def scheme_bits(scheme: dict) -> float | None:
    """Bits a quantized weight parameter costs under a run's scheme: a deployment target's from its
    registry entry, an INT weight's width with its group's 16-bit scale; None where the summary does
    not say (a weight format of its own)."""
    target = TARGETS.get(str(scheme.get("scheme", "")).lower())
    if target is not None:
        return target.weight_bits
    if scheme.get("weight_bits") and not scheme.get("weight_format"):
        return stored_bits(scheme["weight_bits"], scheme.get("group_size"))
    return None


def windows_of(summary: dict, held_out: bool) -> int | None:
    """How many windows a figure of an advise run was measured on: its held-out or selection windows."""
    if held_out:
        return (((summary.get("plan") or {}).get("holdout") or {}).get("windows") or {}).get("windows")
    return (summary.get("windows") or {}).get("windows")


def single_deployment(summary: dict) -> tuple[str | None, str]:
    """``(deployable, how)`` of a run of one scheme, from the files its exports wrote: ``exact`` where a
    library file was written without notes, ``approximate`` with notes, None where none was written
    (not known to be a diagnostic: ``how`` then says why, in the exports' words)."""
    e = summary.get("exports") or {}
    libraries = [name for name, key in (("llm-compressor", "recipe"), ("ModelOpt", "modelopt")) if e.get(key)]
    notes = [str(n) for n in e.get("notes") or []]
    if libraries:
        how, status = " or ".join(libraries), rules.deployability(True, not notes)
        return (status, how) if status == rules.EXACT else (
            status, f"{how}, {rules.BELOW_THE_FORMAT}: " + "; ".join(notes))
    reasons = dict.fromkeys(str(e[k]) for k in ("recipe_note", "modelopt_note") if e.get(k))
    return None, "; ".join(reasons) or "no library file was written"


def offers(summary: dict, run: RunFolder | None = None) -> list[dict]:
    """An advise run's deploy candidates, rank 1 first (summary.json's, else candidates.parquet's), each
    with ``windows``, the number its figure was measured on; a run of one scheme and transform is one
    candidate, its plan (held out where it was checked, else on the windows it was chosen on)."""
    rows = summary.get("candidates")
    if not rows and run is not None and "candidates" in run.tables:
        rows = run.tables["candidates"].to_dicts()
    if rows:
        return [{**r, "windows": windows_of(summary, bool(r.get("held_out")))}
                for r in sorted(rows, key=lambda r: r.get("rank") or 0)]
    plan = summary.get("plan") or {}
    held = plan.get("holdout")
    figure = (held.get("plan") or {}) if held else plan
    share, bits = plan.get("parameter_share"), scheme_bits(summary.get("scheme") or {})
    status, how = single_deployment(summary)
    return [{"scheme": (summary.get("scheme") or {}).get("scheme", ""),
             "transform": summary.get("transform", NONE), "deployable": status, "deploy_with": how,
             "kept_layers": plan.get("kept_layers") or 0,
             "parameter_share_kept": share,
             "bits_per_weight": None if bits is None or share is None
             else share * FULL_PRECISION_BITS + (1 - share) * bits,
             "selection_change_pct": plan.get("change_pct"),
             "selection_within_tolerance": plan.get("within_tolerance"), "held_out": bool(held),
             **{k: figure.get(k) for k in ("change_pct", "change_pct_ci_low", "change_pct_ci_high",
                                           "perplexity")},
             "within_tolerance": bool(held["within_tolerance"] if held else plan.get("within_tolerance")),
             "windows": windows_of(summary, bool(held)), "rank": 1}]


def split_offers(ranked: list[dict]) -> tuple[list[dict], list[dict]]:
    """The candidates a library deploys, and the diagnostics (``deployable`` ``none``), each in rank
    order: a diagnostic is never recommended, whatever its figure."""
    return ([o for o in ranked if o.get("deployable") != rules.NONE],
            [o for o in ranked if o.get("deployable") == rules.NONE])


def roles(ranked: list[dict]) -> list[str]:
    """Each candidate's role on the page, in rank order: ``deploy`` (the first deployable one),
    ``runner-up`` (the next :data:`SHOWN_RUNNERS_UP`), ``diagnostic``, or empty."""
    deployable, _ = split_offers(ranked)
    place = {id(o): "deploy" if i == 0 else "runner-up" if i <= SHOWN_RUNNERS_UP else ""
             for i, o in enumerate(deployable)}
    return [place.get(id(o), "diagnostic") for o in ranked]


def point_estimate_only(plan: dict, tolerance: float | None) -> str | None:
    """Where a plan is within the tolerance by its point estimate while its interval reaches beyond, the
    words that say so, the same in the report and on the terminal; None otherwise."""
    high = plan.get("change_pct_ci_high")
    if not plan.get("within_tolerance") or tolerance is None or high is None or high <= 100 * tolerance:
        return None
    return (f"within the {100 * tolerance:g}% tolerance by its point estimate only: its interval reaches "
            f"{high:+.2f}%, beyond it; more windows (-n) narrow the interval")


def holds(offer: dict, tolerance: float | None, *, short: bool = False) -> str:
    """Whether a candidate held the tolerance, and how: by its whole interval, by its point estimate
    only (its interval reaching beyond), or not at all."""
    goal = "the tolerance" if tolerance is None else f"the {100 * tolerance:g}% tolerance"
    high = offer.get("change_pct_ci_high")
    if not offer.get("within_tolerance"):
        return f"beyond {goal}"
    if tolerance is None:  # (a run that does not record it: its interval cannot be judged against it)
        return f"within {goal}"
    if high is not None and high <= 100 * tolerance:
        return f"within {goal} by its interval" + ("" if short else f" (its upper end, "
                                                   f"{N.percent(high, signed=True)}, is within it)")
    only = point_estimate_only({"within_tolerance": True, "change_pct_ci_high": high}, tolerance)
    if only is None:
        return f"within {goal} by its point estimate (it has no interval: one window)"
    return f"within {goal} by its point estimate only" if short else only


def how_held(offer: dict, tolerance: float | None) -> str:
    """A table cell of :func:`holds`: ``within, by its interval``, ``within, by its point estimate
    only``, or ``beyond``."""
    if not offer.get("within_tolerance"):
        return "beyond"
    high = offer.get("change_pct_ci_high")
    if tolerance is None or high is None:
        return "within"
    return "within, by its interval" if high <= 100 * tolerance else "within, by its point estimate only"


def where(offer: dict, *, short: bool = False) -> str:
    """On which windows a candidate's figure was measured."""
    n = offer.get("windows")
    if offer.get("held_out"):
        return f"on {n} held-out windows" if n else "on the held-out windows"
    chosen = f"on the {n} windows it was chosen on" if n else "on the windows it was chosen on"
    return chosen if short else f"{chosen}, not checked on held-out windows"


def named(offer: dict) -> list[Piece]:
    """The candidate's scheme, marked, and, where it is not the identity, its basis."""
    basis = "" if offer.get("transform", NONE) == NONE else f" in the {offer['transform']} basis"
    return [Marked(str(offer.get("scheme", ""))), basis]


def kept(offer: dict, *, short: bool = False) -> str:
    """How many Linear layers a candidate keeps in full precision, and their share of the parameters."""
    k, share = offer.get("kept_layers") or 0, N.share(offer.get("parameter_share_kept"))
    if short:
        return f"{k} layer{'s' * (k != 1)} kept ({share} of the parameters)"
    return f"{k} Linear layer{'s' * (k != 1)} kept in full precision ({share} of the covered parameters)"


def offer_change(offer: dict) -> str:
    """``+0.31% [-0.10%, +0.72%]``: a candidate's change from fp with its paired interval."""
    return change(offer) or "not finite"


def lead(offer: dict, tolerance: float | None, none_held: bool) -> Paragraph:
    """The first screen's sentence on the candidate to deploy, or, where it failed its check, the
    warning that says so first (``none_held``: no other deployable candidate held the tolerance)."""
    figure = [Marked(offer_change(offer)), f" {where(offer)}"]
    if offer.get("within_tolerance"):
        verb = "Deploy" if offer.get("deployable") in (rules.EXACT, rules.APPROXIMATE) else "The plan:"
        return Paragraph("deploy", [f"{verb} ", *named(offer), f" with {kept(offer)}: ", *figure, ", ",
                                    *_options_marked(holds(offer, tolerance)), "."])
    chosen = N.percent(offer.get("selection_change_pct"), signed=True)
    check = "held-out check" if offer.get("held_out") else "check on the windows it was chosen on"
    others = " No deployable candidate held it." if none_held else ""
    return Paragraph("failed", [
        Marked(f"The plan failed its {check}."), " ", *named(offer), f" with {kept(offer)}: ", *figure,
        f", {holds(offer, tolerance)}"
        + (f" ({chosen} on the windows it was chosen on)" if offer.get("held_out") and chosen else "")
        + f".{others} Do not deploy it as it is: advise on more windows (", Marked("-n", CODE),
        ") chooses on more evidence, and a smaller ", Marked("--tolerance", CODE), " keeps more layers."])


WHY_BEHIND = {"diagnostic": "it is a diagnostic, never recommended",
              "tolerance": "it does not hold the tolerance",
              "bits": "more bits per weight ({other} against {first})",
              "approximate": "it is deployed approximately, the first exactly",
              "change": "a larger change from fp"}
"""Why a candidate ranks behind another, by the rule of the ranking that puts it there."""


def behind(best: dict, other: dict) -> str:
    """Why a candidate ranks behind the first, by the first rule of the ranking
    (:data:`~kernelscope.results.decision_rules.RANKING`) on which the two differ where both record
    it; empty where that rule does not put it behind, or none does."""
    for rule in rules.RANKING:
        first, second = rule.value(best), rule.value(other)
        if first is not None and second is not None and first != second:
            if not second > first:
                return ""
            why = WHY_BEHIND[rule.name]
            return why.format(first=N.bits(first), other=N.bits(second)) if rule.name == "bits" else why
    return ""


def offer_line(offer: dict, best: dict | None, tolerance: float | None) -> list[Piece]:
    """One candidate in one line: its change and windows, whether it holds the tolerance, what it keeps,
    its bits per weight, how it deploys, and why it ranks behind the first."""
    how = str(offer.get("deploy_with") or "") if offer.get("deployable") == rules.NONE else brief(
        offer.get("deploy_with"))
    status = DEPLOYED.get(str(offer.get("deployable")), "")
    why = "" if best is None else behind(best, offer)
    return [f"#{offer.get('rank', '')} ", *named(offer),
            f": {offer_change(offer)} {where(offer, short=True)}, {holds(offer, tolerance, short=True)}; "
            f"{kept(offer, short=True)}, {N.bits(offer.get('bits_per_weight')) or '?'} bits per weight; "
            f"{status}{': ' + how if how else ''}"
            + (f" (behind #{best.get('rank', '')}: {why})" if why else "")]


def better(diagnostic: dict, best: dict | None) -> bool:
    """Whether a diagnostic measured better than the candidate to deploy: within tolerance with a
    smaller change from fp, or with fewer bits per weight."""
    if best is None or not diagnostic.get("within_tolerance"):
        return False
    smaller = (diagnostic.get("change_pct") is not None and best.get("change_pct") is not None
               and diagnostic["change_pct"] < best["change_pct"])
    fewer = (diagnostic.get("bits_per_weight") is not None and best.get("bits_per_weight") is not None
             and diagnostic["bits_per_weight"] < best["bits_per_weight"] - 1e-9)
    return smaller or fewer


# -- the files and commands that deploy it ------------------------------------------------------------

def own_basis(scheme: str, transform: str) -> tuple[str, list[str]]:
    """The ``--transform`` that gives ``scheme`` a run's basis, and the options its own transform
    needs: a ``*-smoothquant`` scheme smooths by itself (its migration strength as ``--smooth-alpha``),
    and so does a target whose first step is none a user names (ModelOpt's smoothquant)."""
    steps = [] if transform in ("", NONE) else transform.split(COMPOSE)
    if steps and steps[0].partition(":")[0] not in TRANSFORMS:
        steps.pop(0)
    extra: list[str] = []
    if scheme.endswith("-smoothquant") and steps and steps[0].startswith("smoothquant"):
        strength = steps.pop(0).partition(":")[2]
        extra = ["--smooth-alpha", strength] if strength else []
    return COMPOSE.join(steps) or NONE, extra


def measure_again(summary: dict, folder: Path) -> str:
    """The eval command that measures an advise run's plan again on the windows it was chosen on: its
    model, text and windows, fp and its scheme in its basis, the calibration text it was calibrated on,
    and the run folder as ``--ignore @DIR`` (the layers the plan keeps)."""
    scheme = summary.get("scheme") or {}
    name = str(scheme.get("scheme", "SCHEME"))
    basis, extra = own_basis(name, str(summary.get("transform") or NONE))
    extra = ["--scheme", f"fp,{name}", *extra]
    if basis != NONE:
        extra += ["--transform", basis]
    if scheme.get("alpha") is not None and name.endswith("crossquant"):
        extra += ["--alpha", f"{scheme['alpha']:g}"]
    calibration = summary.get("calibration") or {}
    if (calibration.get("text") or {}).get("source"):
        extra += ["--calib-dataset", str(calibration["text"]["source"]),
                  "--calib-nsamples", str((calibration.get("windows") or {}).get("windows") or 1)]
    return rerun_command(summary, "eval", *extra, "--ignore", f"@{folder}")


def _write_command(summary: dict, best: dict, output: str) -> str:
    """The advise command that plans the candidate alone and writes its files to ``output``."""
    basis = [] if best.get("transform", NONE) == NONE else ["--transform", str(best["transform"])]
    return rerun_command(summary, "advise", "--scheme", str(best.get("scheme")), *basis, "-o", output)


def deploy_files(summary: dict, folder: Path, best: dict) -> list[list[Piece]]:
    """The files that deploy the candidate, by their absolute paths in the run folder, and the commands
    that measure it again, a paragraph each; where the folder holds another candidate's files (its first
    is a diagnostic), the command that writes this one's."""
    scheme = (summary.get("scheme") or {}).get("scheme")
    if (scheme, summary.get("transform", NONE)) != (best.get("scheme"), best.get("transform", NONE)):
        return [[f"This folder holds the files of {scheme}, not of {best.get('scheme')}: ",
                 Marked(_write_command(summary, best, "runs/deploy"), CODE), " writes them."]]
    e = summary.get("exports") or {}
    kinds = [("llm-compressor recipe", "recipe", "recipe_note"),
             ("ModelOpt config", "modelopt", "modelopt_note"),
             ("the kept layers, one a line", "modules", None)]
    files: list[list[Piece]] = []
    missing: dict[str, list[str]] = {}
    for what, key, note in kinds:
        if e.get(key):
            files.append([f"{what} ", Marked(str(folder / str(e[key])), CODE)])
        elif note and e.get(note):
            missing.setdefault(str(e[note]), []).append(what)
    why = "; ".join(f"no {' or '.join(whats)}: {reason}" for reason, whats in missing.items())
    aside = [" ", Marked(f"({why})", ASIDE)] if why else []
    said = [[Marked("Files"), ": ", *joined(files, "; "), ".", *aside],
            [Marked("Measure it again"), " on the windows it was chosen on: ",
             Marked(measure_again(summary, folder), CODE)]]
    if e.get("recipe"):
        recipe = rerun_command(summary, "eval", "--scheme", f"fp,llm-compressor:@{folder / str(e['recipe'])}")
        said.append([Marked("What the recipe itself deploys"), ": ", Marked(recipe, CODE)])
    return said


# -- what was not evaluated that might beat it --------------------------------------------------------

def step_names(transform: object) -> set[str]:
    """The transforms a basis label applies: ``smoothquant:0.5+hadamard`` → smoothquant, hadamard."""
    return {step.partition(":")[0] for step in str(transform or NONE).split(COMPOSE) if step != NONE}


def fewer_bits(summary: dict, ranked: list[dict], best: dict) -> list[Piece] | None:
    """The deployment targets with fewer bits per weight than the candidate to deploy, none of them
    among the candidates (each ranks above it wherever it holds the tolerance), with the advise command
    that ranks the nearest three; None where there is none or the bits are unknown."""
    mine = best.get("bits_per_weight")
    if mine is None:
        return None
    tried = {str(o.get("scheme", "")).lower() for o in ranked}
    seen = {t.computes for key, t in TARGETS.items() if key in tried}
    found = []
    for t in sorted(TARGETS.values(), key=lambda t: -t.weight_bits):  # the nearest first
        arithmetic = t.computes  # one name of two for the same scheme
        if t.quantizes_activations and arithmetic not in seen and t.weight_bits < mine - 1e-9:
            seen.add(arithmetic)
            found.append((t.weight_bits, t))
    if not found:
        return None
    shown = ", ".join(f"{t.label} ({N.bits(bits)})" for bits, t in found[:SHOWN_UNTRIED])
    more = f" and {len(found) - SHOWN_UNTRIED} more" if len(found) > SHOWN_UNTRIED else ""
    added = [own_basis(str(o.get("scheme", "")), str(o.get("transform") or NONE))[0] for o in ranked]
    bases = sorted(dict.fromkeys(added), key=lambda b: b != NONE)  # the bases given, as --transform
    options = [] if bases == [NONE] else ["--transform", ",".join(bases)]
    calibration = ((summary.get("calibration") or {}).get("text") or {}).get("source")
    if calibration and any(t.needs_calibration for _, t in found[:3]):  # on the run's calibration text
        options += ["--calib-dataset", str(calibration)]
    command = rerun_command(summary, "advise", "--scheme", ",".join(t.label for _, t in found[:3]), *options,
                            "-o", "runs/fewer-bits")
    return [(f"deployment targets with fewer bits per weight than its {N.bits(mine)}, none of them a "
             f"candidate: {shown}{more}; each ranks above it wherever it holds the tolerance ("),
            Marked(command, CODE), " ranks the nearest three)"]


def untried(summary: dict, ranked: list[dict], best: dict) -> list[list[Piece]]:
    """What was not evaluated that might beat the candidate to deploy: deployment targets with fewer
    bits, transforms a library deploys that no candidate tried (where layers stay in full precision,
    which a transform may spare), and per-layer figures where the plan keeps layers without them."""
    said = [line for line in [fewer_bits(summary, ranked, best)] if line]
    tried = set().union(*(step_names(o.get("transform")) for o in ranked))
    keeps = (best.get("kept_layers") or 0) > 0
    if keeps or best.get("deployable") != rules.EXACT:
        for name, entry in TRANSFORMS.items():
            if name not in tried and entry.deployed_by:
                how = brief(entry.deployed_by)
                said.append([(f"the {name} transform, which no candidate tried: it may let fewer layers "
                              f"stay in full precision, deployed approximately ({how})")])
    if keeps and "layer" not in ((summary.get("settings") or {}).get("groups") or ["layer"]):
        said.append([Own("each layer's own figure: "), Marked("--per-layer", CODE),
                     " plans from them and may keep fewer parameters"])
    return said


# -- the deployment decision of an advise run ---------------------------------------------------------

@dataclass
class DeployDecision:
    """The first screen of an advise run, in words: the candidate to deploy (None where every one is a
    diagnostic) and its :class:`Paragraph`, how it deploys, the files and commands (a paragraph each),
    the runners-up, what was not evaluated that might beat it, and the diagnostics (a line each)."""

    best: dict | None
    lead: Paragraph
    how: list[Piece] = field(default_factory=list)
    files: list[list[Piece]] = field(default_factory=list)
    runners: list[list[Piece]] = field(default_factory=list)
    untried: list[list[Piece]] = field(default_factory=list)
    diagnostics: list[list[Piece]] = field(default_factory=list)


def written(summary: dict, run: RunFolder | None) -> bool:
    """Whether an advise run was written to its folder (its files are there to name), rather than shown
    before it was written (no ``-o``)."""
    return run is not None and bool(summary.get("output") or (run.path / "summary.json").is_file())


def _how(best: dict) -> list[Piece]:
    """``How: deployed approximately, by ModelOpt, ...``; nothing where no library file was written
    (the files say why)."""
    status, how = DEPLOYED.get(str(best.get("deployable"))), str(best.get("deploy_with") or "").rstrip(".")
    if not (how and status):
        return []
    again = best.get("deployable") == rules.APPROXIMATE and "measure the deployed model again" not in how
    return [Marked("How"), f": {status}, by {how}." + (" Measure the deployed model again." if again else "")]


def deploy_decision(summary: dict, run: RunFolder | None = None) -> DeployDecision:
    """The deployment decision of an advise run: the candidate to deploy in one sentence with its
    held-out change and interval (or the warning that it failed its check), how it deploys, the files
    and commands, the runners-up, what was not evaluated that might beat it, and the diagnostics, never
    recommended, each marked where its figure is better than the candidate's."""
    tolerance, ranked = summary.get("tolerance"), offers(summary, run)
    deployable, diagnostics = split_offers(ranked)
    best = deployable[0] if deployable else None
    lines = [offer_line(o, None, tolerance)
             + ([" ", Marked("(a better figure than the candidate to deploy)")] if better(o, best) else [])
             for o in diagnostics]
    if best is None:
        return DeployDecision(None, Paragraph("failed", [
            Marked("No candidate can be deployed as measured"),
            ": every one is a diagnostic, and none is recommended."]), diagnostics=lines)
    none_held = len(deployable) > 1 and not any(o.get("within_tolerance") for o in deployable)
    if written(summary, run):
        files = deploy_files(summary, run.path.resolve(), best)
    else:  # a result shown before it was written (no -o): no files yet
        write = _write_command(summary, best, "runs/advice")
        files = [["This plan was not written to a folder: ", Marked(write, CODE),
                  " writes its files and prints the command that measures it again."]]
    return DeployDecision(best, lead(best, tolerance, none_held), _how(best), files,
                          [offer_line(o, best, tolerance) for o in deployable[1:1 + SHOWN_RUNNERS_UP]],
                          untried(summary, ranked, best), lines)


# -- what to do, in words -----------------------------------------------------------------------------

FEW_WINDOWS = 8
"""Below this many windows a bootstrap interval is too rough to act on; the first screen says so."""
INTERVAL_KINDS = ("eval", "threshold", "sweep", "advise", "sensitivity")
"""The runs whose figures carry intervals resampled over their windows."""


def _advised(advices) -> list[list[Piece]]:
    """What quantizing every layer costs in the first advise run, and the kernel's share of that loss."""
    said: list[list[Piece]] = []
    for _, s in advices[:1]:  # the candidate to deploy is said above, in the advise run's own words
        whole = s.get("quantized") or {}
        held = ((s.get("plan") or {}).get("holdout") or {}).get("quantized")
        said.append([f"Quantizing every layer with {(s.get('scheme') or {}).get('scheme', 'the scheme')} "
                     f"costs {change(whole) or 'a loss that is not finite'} on the windows the plan was "
                     "chosen on" + (f", {change(held)} on the held-out windows" if held else "") + "."])
        share = s.get("kernel_explains") or {}
        if share.get("share") is not None:
            said.append([("Removing only the kernel causes "
                          f"{kernel_share(share['share'], share.get('ci_low'), share.get('ci_high'))} "
                          "of that loss.")])
        elif share.get("note"):
            said.append([Own("The kernel's share of that loss is "), str(share["note"]), "."])
    return said


def recommendation(evals, sweeps, advices) -> list[list[Piece]]:
    """Sentences on what to deploy: advise's plan first, else the evaluated scheme closest to fp."""
    said = _advised(advices)
    quantized = [{**r, "ignored": (s.get("layers") or {}).get("ignore")}
                 for _, s in evals for r in s["results"]
                 if r.get("change_pct") is not None and r.get("perplexity") is not None and fake_quantized(r)]
    if quantized:
        best = min(quantized, key=lambda r: r["perplexity"])
        basis = "" if best.get("transform", NONE) == NONE else f", {best['transform']}"
        weighed = f" ({weights(best)})" if weights(best) else ""
        ignored = best["ignored"]
        kept_layers = f", the layers of --ignore {ignored} kept in full precision" if ignored else ""
        every = " with every layer quantized" if advices and not kept_layers else ""
        said.append([f"Of the schemes evaluated{every}, ", Marked(best["scheme"] + basis),
                     f"{weighed}{kept_layers} is closest to fp: {change(best)} ({best.get('vs_fp') or ''})."])
    for _, s in sweeps[:1]:
        rows = [r for r in s["results"] if r.get("alpha") is not None and r.get("perplexity") is not None]
        if rows:
            best = min(rows, key=lambda r: r["perplexity"])
            said.append([f"The CrossQuant sweep is best at α = {best['alpha']:g} ({change(best)})."])
    return said


def smallest_4bit(profiles) -> dict | None:
    """The smallest model-level 4-bit kernel of the profiles, whatever its grid (INT4, FP4)."""
    rows = [r for _, run in profiles for r in run.summary.get("model_level") or [] if r.get("bits") == 4]
    return min(rows, key=lambda r: r["kernel_fraction"], default=None)


def int4(evals, profiles, located, advices=()) -> list[str]:
    """Whether 4-bit activations are viable: measured in an evaluation, else the smallest 4-bit kernel,
    named by its grid, against a threshold located on this model for its own family and basis."""
    rows = [r for _, s in evals for r in s["results"] if r.get("activation_bits") == 4
            and r.get("change_pct") is not None and r.get("perplexity") is not None and fake_quantized(r)]
    for _, advice in advices:
        scheme = advice.get("scheme") or {}
        if (scheme.get("activation_bits") == 4
                and (advice.get("quantized") or {}).get("perplexity") is not None):
            rows.append({**advice["quantized"], "transform": advice.get("transform", NONE)})
    said = []
    if rows:
        best = min(rows, key=lambda r: r["perplexity"])
        weighed = f", {weights(best)}" if weights(best) else ""
        said.append(f"4-bit activations: the best evaluated, {best['scheme']}"
                    f"{'' if best.get('transform', NONE) == NONE else ', ' + best['transform']}"
                    f"{weighed}, costs {change(best)} with every layer quantized.")
    best = smallest_4bit(profiles)
    if best is None or not located:
        return said
    first = (f"{'Its' if said else '4-bit activations: the'} smallest 4-bit kernel measured, "
             f"{series(best)}, on an {F.grid_name(best)} grid, at {N.share(best['kernel_fraction'])}")
    mine = [t for t in located if t.applies_to(best)]
    if mine:
        words = {"below": "is below", "above": "is above", "within": "lies within the interval of"}
        said.append(f"{first}, {words[side(best, mine[0])]} the {mine[0].text()} threshold located on "
                    "this model for its family.")
    else:
        said.append(f"{first}: no threshold measured for its family (the one located holds for "
                    f"{', '.join(t.label for t in located)} only).")
    return said


def model_name(summary: dict) -> str:
    """The model a run was made on, as the report names it."""
    model = summary.get("model") or {}
    return str(model.get("path") or model.get("architecture") or "")


def of_model(pairs, name: str) -> list:
    """The (label, run or summary) pairs whose run was made on the model ``name``."""
    return [(label, run) for label, run in pairs
            if model_name(run.summary if isinstance(run, RunFolder) else run) == name]


def _thresholds_said(profiles, thresholds, located) -> list[list[Piece]]:
    """The profile's model-level kernel, the thresholds located on this model, and a search that did not
    bracket its crossing, a sentence each."""
    said: list[list[Piece]] = []
    for label, run in profiles[:1]:  # what the profile measured, in one sentence
        level = run.summary.get("model_level") or []
        if level:
            said.append([f"The model-level kernel ({label}): " + ", ".join(
                f"{series(r)} {N.share(r['kernel_fraction'])}" for r in level) + "."])
    if located:
        said.append(["The kernel threshold located on this model, for its own family and basis only: "
                     + "; ".join(f"{t.label} {t.text()}" for t in located) + "."])
    unbracketed = [(t.get("family") or {}, search) for _, t in thresholds for search in F.searches_of(t)
                   if search.get("status") != BRACKETED
                   and search.get("threshold_kernel_fraction") is not None]
    for searched, search in unbracketed[:1]:
        said.append([(f"The threshold search did not bracket a crossing ({search.get('status', '')}): "
                      f"every {searched.get('label', '')} kernel up to "
                      f"{N.share(search['threshold_kernel_fraction'])} stayed within the tolerance.")])
    return said


def advice_sentences(profiles, thresholds, evals, sweeps, advices, family: str | None,
                     source: dict) -> list[list[Piece]]:
    """What to do, in words, from the runs of one model (``source``: the summary whose model, text and
    windows the commands suggested repeat)."""
    located = located_thresholds(thresholds)
    said = recommendation(evals, sweeps, advices) + [[s] for s in int4(evals, profiles, located, advices)]
    said += _thresholds_said(profiles, thresholds, located)
    if family and not located:
        said.append([Own(f"The CrossQuant paper's reference for {family} models is "
                         f"{100 * REFERENCE_THRESHOLDS[family]:g}% (the paper's, not measured here: "),
                     suggested(source, "threshold"), Own(" locates this model's).")])
    if profiles and not located:  # no judging against another model's reference
        steps = [] if family else [[suggested(source, "threshold"), " locates one"]]
        if not evals and not advices:
            steps.append([suggested(source, "eval"), " or ", suggested(source, "advise"),
                          " measures what a scheme costs"])
        said.append(["With no kernel threshold bracketed on this model, its kernels are not judged here",
                     *([": ", *joined(steps, "; ")] if steps else []), "."])
    if not said:
        said.append(["No evaluation in these runs: ", suggested(source, "advise"), " or ",
                     suggested(source, "eval"), " measures what a scheme costs."])
    return said


def measured_apart(labelled) -> list[list[str]]:
    """The runs, by label, grouped by the text, windows and length they were measured on, where they
    were measured on more than one (their figures compare with care); empty where on one."""
    bases: dict[tuple, list[str]] = {}
    for label, run in labelled:
        if run.summary.get("text") or run.summary.get("windows"):
            bases.setdefault(measured_on(run.summary), []).append(label)
    return list(bases.values()) if len(bases) > 1 else []


def too_few_windows(labelled) -> dict[str, int]:
    """The runs, by label, whose intervals were resampled from fewer than :data:`FEW_WINDOWS` windows,
    with their number of windows."""
    return {label: n for label, run in labelled if run.summary.get("kind") in INTERVAL_KINDS
            and (n := (run.summary.get("windows") or {}).get("windows") or 0) and n < FEW_WINDOWS}
