"""The rules a deploy candidate is judged by, written once for the run that ranks the candidates and for
the report that explains the ranking: what its ``deployable`` words mean, and the order of the ranking.

``deployable`` is one of three words:

- ``exact``: a library (llm-compressor or ModelOpt) computes the candidate as it was measured;
- ``approximate``: a library computes it in its own way (a transform it applies as it does, or
  arithmetic that differs below the format), so the deployed model must be measured again;
- ``none``: no library computes it: a diagnostic, shown and never recommended.

The ranking compares two candidates rule by rule, first to last, and the first rule on which they differ
decides (:data:`RANKING`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

EXACT, APPROXIMATE, NONE = "exact", "approximate", "none"
"""The three values of a candidate's ``deployable``."""

DEPLOYED = {EXACT: "deployed exactly as measured", APPROXIMATE: "deployed approximately",
            NONE: "no deployment path"}
"""Each value of ``deployable`` in words."""

BELOW_THE_FORMAT = "whose arithmetic differs below the format"
"""Why a library that quantizes a scheme without a transform still deploys it approximately."""


def deployability(library: bool, as_measured: bool) -> str:
    """A candidate's ``deployable``: ``none`` where no library computes it, ``exact`` where one computes it
    as it was measured (``as_measured``), else ``approximate``."""
    if not library:
        return NONE
    return EXACT if as_measured else APPROXIMATE


def _rounded(bits: float | None) -> float | None:
    """Bits per weight to 6 decimals, so that two sums of the same shares compare equal."""
    return None if bits is None else round(bits, 6)


@dataclass(frozen=True)
class Rule:
    """One rule of the ranking: ``name``, and ``value``, a candidate row's figure under it, the smaller
    ranking first (None where the row does not record it)."""

    name: str
    value: Callable[[Mapping], object]


RANKING: tuple[Rule, ...] = (
    Rule("diagnostic", lambda row: row.get("deployable") == NONE),  # deployable before diagnostic
    Rule("tolerance", lambda row: not row.get("within_tolerance")),  # within tolerance before not
    Rule("bits", lambda row: _rounded(row.get("bits_per_weight"))),  # fewer bits per weight parameter
    Rule("approximate", lambda row: row.get("deployable") != EXACT),  # exact before approximate
    Rule("change", lambda row: row.get("change_pct")),  # the smaller change from fp
)
"""The ranking of deploy candidates, first rule first."""


def _orderable(value: object) -> object:
    """A rule's value as a sort key: one the row does not record, or not finite, after every other."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return math.inf
    return value


def rank_key(row: Mapping) -> tuple:
    """The sort key of a candidate row under :data:`RANKING`: sorting by it puts the one to deploy
    first."""
    return tuple(_orderable(rule.value(row)) for rule in RANKING)
