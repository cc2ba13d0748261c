"""The report's payloads packed into the page: gzip-compressed and written in base 64 inside inert
``<script type="text/plain">`` elements, so that the page needs neither a network nor a server.

plotly.js is plotly's *cartesian* partial bundle (scatter, heatmap and the other 2-D traces; the
report draws no other), shipped in the package already gzipped (``assets/README.md`` says where it
comes from): 1.5 MB as plotly distributes it, 0.5 MB gzipped, about 0.66 MB in base 64. The page
unpacks both payloads with the browser's own ``DecompressionStream('gzip')`` (:data:`UNPACK_JS`),
asynchronously, and draws the figures once both are unpacked.
"""

from __future__ import annotations

import base64
import binascii
import functools
import gzip
import zlib
from importlib import resources

PLOTLY_VERSION = "4.1.1"
"""The plotly.js version of the shipped bundle (the one ``plotly`` 7.1.0 ships)."""
PLOTLY_BUNDLE = f"plotly-cartesian-{PLOTLY_VERSION}.min.js.gz"
"""plotly.js's cartesian bundle as plotly distributes it, gzipped, in the ``assets`` folder."""


def _asset_file(name: str):
    """A file of the package's ``assets`` folder, wherever the package is installed (a wheel too)."""
    return resources.files("kernelscope.reports") / "assets" / name


def asset(name: str) -> str:
    """A file of the report's page (style sheet, scripts), shipped in the package's ``assets`` folder."""
    return _asset_file(name).read_text(encoding="utf-8")


def pack(data: bytes) -> str:
    """``data`` gzipped (level 9, no time stamp: the same data packs to the same text) in base 64."""
    return base64.b64encode(gzip.compress(data, compresslevel=9, mtime=0)).decode("ascii")


def unpack(text: str) -> bytes:
    """The bytes :func:`pack` wrote as ``text``; a ValueError where ``text`` is not such a payload."""
    try:
        return gzip.decompress(base64.b64decode(text, validate=True))
    except (binascii.Error, gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise ValueError(f"not a packed payload of a kernelscope report ({exc})") from None


@functools.lru_cache(maxsize=1)
def packed_plotly() -> str:
    """plotly.js's cartesian bundle, packed: the shipped gzip file as it is, in base 64."""
    return base64.b64encode(_asset_file(PLOTLY_BUNDLE).read_bytes()).decode("ascii")


UNPACK_JS = asset("unpack.js")
"""The page's unpacker of what :func:`pack` wrote."""
