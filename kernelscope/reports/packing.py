"""The report's payload packed into the page: LZMA-compressed (the ``.lzma`` container) and written in
base 85 over an alphabet with no character HTML gives a meaning to inside a ``<script>`` element
(``<``, ``>``, ``&``, quotes, backslash), so that the page needs neither a network nor a server.

plotly.js is 4.8 MB as it ships; packed it is about 1.4 MB. The browser unpacks it with
:data:`UNPACK_JS` (a range decoder and the LZMA literal/match model, about 100 lines), which takes a
few hundred milliseconds when the page opens.
"""

from __future__ import annotations

import functools
import json
import lzma
from importlib import resources

import numpy as np


def asset(name: str) -> str:
    """A file of the report's page (style sheet, scripts), shipped in the package's ``assets`` folder."""
    return (resources.files("kernelscope.reports") / "assets" / name).read_text(encoding="utf-8")


ALPHABET = "".join(c for c in map(chr, range(33, 127)) if c not in "<>&\\\"'`")[:85]
"""The 85 digits, in value order."""

_FILTERS = [{"id": lzma.FILTER_LZMA1, "preset": 6, "lc": 2, "lp": 0, "pb": 0, "nice_len": 128}]


def b85encode(data: bytes) -> str:
    """``data`` as base-85 digits, five per four bytes (big-endian), the last group zero-padded."""
    padded = data + b"\0" * (-len(data) % 4)
    words = np.frombuffer(padded, dtype=">u4").astype(np.int64)  # (n,)
    digits = np.empty((len(words), 5), dtype=np.uint8)  # (n, 5), most significant first
    for i in range(4, -1, -1):
        words, digits[:, i] = np.divmod(words, 85)
    table = np.frombuffer(ALPHABET.encode("ascii"), dtype=np.uint8)
    return table[digits.reshape(-1)].tobytes().decode("ascii")


def b85decode(text: str, size: int) -> bytes:
    """The first ``size`` bytes that :func:`b85encode` wrote as ``text``."""
    lookup = np.full(128, 255, dtype=np.uint8)
    lookup[np.frombuffer(ALPHABET.encode("ascii"), dtype=np.uint8)] = np.arange(85, dtype=np.uint8)
    digits = (lookup[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
              .astype(np.int64).reshape(-1, 5))  # (n, 5)
    if (digits == 255).any():
        raise ValueError("not base-85 text of a kernelscope report")
    words = np.zeros(len(digits), dtype=np.int64)
    for i in range(5):
        words = words * 85 + digits[:, i]
    return words.astype(">u4").tobytes()[:size]


def pack(data: bytes) -> tuple[str, int, int]:
    """``data`` compressed and in base 85, with the compressed and the original length."""
    packed = lzma.compress(data, format=lzma.FORMAT_ALONE, filters=_FILTERS)
    return b85encode(packed), len(packed), len(data)


def unpack(text: str, packed_size: int) -> bytes:
    return lzma.decompress(b85decode(text, packed_size), format=lzma.FORMAT_ALONE)


@functools.lru_cache(maxsize=1)
def packed_plotly() -> tuple[str, int, int]:
    """plotly.js, packed once per process (about two seconds of compression)."""
    from plotly.offline import get_plotlyjs

    return pack(get_plotlyjs().encode("utf-8"))


UNPACK_JS = asset("unpack.js").replace('"KS_ALPHABET"', json.dumps(ALPHABET))
"""The page's unpacker of what :func:`pack` wrote (the alphabet filled in from :data:`ALPHABET`)."""
