"""Text from the hub (wikitext2, c4, pileval), a local file (.txt, .jsonl, .parquet), or ``pydoc``.

Every source ends as one string: documents are joined with ``"\\n\\n"``, the join the WikiText-2
perplexity protocol uses (SmoothQuant, AWQ, GPTQ, OmniQuant).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from kernelscope.errors import KernelscopeError
from kernelscope.hub import hub_unreachable_reason

DOC_SEPARATOR = "\n\n"

HUB_DATASETS = {
    "wikitext2": "WikiText-2 raw, test split (wikitext / wikitext-2-raw-v1)",
    "c4": "C4 English, first validation shard (allenai/c4)",
    "pileval": "The Pile, validation (mit-han-lab/pile-val-backup)",
}
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
STRUCTURED_SUFFIXES = {".json": "a JSON file", ".csv": "a CSV table", ".tsv": "a TSV table"}
"""Files of records whose fields kernelscope does not read: refused, not read as one text."""
SAMPLE_BYTES = 65536
"""How much of a file the checks for binary data and other encodings look at."""
WIDE_ENCODINGS = (  # (encoding, byte order, byte-order mark, bytes a character, where ASCII has NULs)
    ("UTF-32", "LE", codecs.BOM_UTF32_LE, 4, (1, 2, 3)),
    ("UTF-32", "BE", codecs.BOM_UTF32_BE, 4, (0, 1, 2)),
    ("UTF-16", "LE", codecs.BOM_UTF16_LE, 2, (1,)),
    ("UTF-16", "BE", codecs.BOM_UTF16_BE, 2, (0,)),
)
"""The Unicode encodings other than UTF-8 a text file may be in (UTF-32's marks first: UTF-32LE's begins
with UTF-16LE's). Without a mark, text mostly in the first 256 code points has a NUL at the same places
of nearly every character and almost none elsewhere."""
BYTE_ORDERS = {"LE": "little-endian", "BE": "big-endian"}


@dataclass(frozen=True)
class TextSource:
    """A whole text and where it came from."""

    name: str
    description: str
    text: str

    @property
    def sha256(self) -> str:
        """Fingerprint of the exact text (UTF-8), so two runs can tell whether they read the same."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _checked(name: str, description: str, text: str) -> TextSource:
    if not text.strip():
        raise KernelscopeError(f"the text from {name} is empty")
    return TextSource(name, description, text)


class OtherEncodingError(KernelscopeError):
    """A text file in a Unicode encoding other than UTF-8. ``iconv_name`` is the encoding as iconv
    reads it: with its byte order where no byte-order mark says it (``UTF-16LE``), else without
    (``UTF-16``, so the mark is dropped)."""

    def __init__(self, encoding: str, byte_order: str, marked: bool):
        super().__init__(f"looks like {encoding} ({BYTE_ORDERS[byte_order]}) text; kernelscope reads UTF-8")
        self.iconv_name = encoding if marked else encoding + byte_order

    def advice(self, option: str, source: str, path: Path) -> str:
        """The one-line refusal of the file given to ``option`` as ``source``, with the command that
        converts it (named as typed where a shell reads that unchanged, else by its full path)."""
        shown = source if shlex.quote(source) == source else str(path)
        target = str(Path(shown).with_name(f"{path.stem}-utf8{path.suffix}"))
        return (f"{option} {source} {self}: convert it with iconv -f {self.iconv_name} -t UTF-8 "
                f"{shlex.quote(shown)} > {shlex.quote(target)}")


def _wide_encoding(data: bytes) -> OtherEncodingError | None:
    """The UTF-16 or UTF-32 encoding ``data`` is in, by its byte-order mark or, without one, by where
    its NULs are; None when it is in neither (or does not decode as the one it looks like)."""
    for encoding, order, bom, width, nul_at in WIDE_ENCODINGS:
        marked = data.startswith(bom)
        if not marked and not _nuls_at(data[:SAMPLE_BYTES], width, nul_at):
            continue
        try:
            data[len(bom) if marked else 0:].decode(f"{encoding}-{order}")
        except UnicodeDecodeError:
            continue
        return OtherEncodingError(encoding, order, marked)
    return None


def _nuls_at(sample: bytes, width: int, nul_at: tuple[int, ...]) -> bool:
    """Whether most bytes at ``nul_at`` (offsets within each ``width``-byte character) are NUL and
    almost none of the others are."""
    chars = len(sample) // width
    if chars < 2:
        return False
    share = [sample[offset:chars * width:width].count(0) / chars for offset in range(width)]
    return all(share[i] >= 0.5 if i in nul_at else share[i] <= 0.1 for i in range(width))


def _read_txt(path: Path) -> str:
    data = path.read_bytes()
    wide = _wide_encoding(data)
    if wide is not None:
        raise wide
    if b"\x00" in data[:SAMPLE_BYTES]:
        raise KernelscopeError(f"{path} looks like a binary file, not text")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not part of the text
    except UnicodeDecodeError as exc:
        raise KernelscopeError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded)") from None


def _read_jsonl(path: Path) -> str:
    docs: list[str] = []
    for number, line in enumerate(_read_txt(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KernelscopeError(f"{path}:{number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise KernelscopeError(f"{path}:{number} has no string field 'text'")
        docs.append(record["text"])
    return DOC_SEPARATOR.join(docs)


def _read_parquet(path: Path) -> str:
    import polars as pl

    try:
        frame = pl.read_parquet(path, columns=None)
    except Exception as exc:  # polars raises several types for a damaged file
        raise KernelscopeError(f"{path} is not a readable parquet file ({type(exc).__name__})") from None
    if "text" not in frame.columns:
        raise KernelscopeError(f"{path} has no column 'text' (columns: {', '.join(frame.columns)})")
    if frame.schema["text"] != pl.String:
        raise KernelscopeError(f"{path}: column 'text' holds {frame.schema['text']}, not strings")
    return DOC_SEPARATOR.join(t for t in frame["text"].to_list() if t is not None)


def _read_pydoc() -> str:
    from pydoc_data.topics import topics

    return DOC_SEPARATOR.join(topics[key] for key in sorted(topics))


def _read_hub(name: str, max_chars: int | None, option: str) -> str:
    reason = hub_unreachable_reason()
    if reason is not None:
        raise KernelscopeError(
            f"{option} {name} needs the Hugging Face hub, which cannot be reached: {reason}; to run "
            f"offline, give {option} pydoc (Python's documentation) or {option} path/to/text.txt (a local "
            ".txt, .jsonl or .parquet file)"
        )
    from datasets import load_dataset

    try:
        if name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        elif name == "c4":
            rows = load_dataset(
                "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                split="validation",
            )
        else:
            rows = load_dataset("mit-han-lab/pile-val-backup", split="validation")
    except Exception as exc:
        first = str(exc).splitlines()[0]
        raise KernelscopeError(f"cannot load {option} {name} from the hub: {first}") from None
    if name == "wikitext2" or max_chars is None:
        return DOC_SEPARATOR.join(rows["text"])
    docs, size = [], 0
    for text in rows["text"]:
        docs.append(text)
        size += len(text) + len(DOC_SEPARATOR)
        if size >= max_chars:
            break
    return DOC_SEPARATOR.join(docs)


def load_text(source: str, *, max_chars: int | None = None, option: str = "--dataset") -> TextSource:
    """Read the text named by ``source``.

    ``wikitext2`` is read whole (the perplexity protocol). For ``c4`` and ``pileval`` documents are
    read in order until ``max_chars`` characters, when given, since those corpora are large.
    ``option`` is how errors name the source (the command-line option that gave it).
    """
    key = source.strip().lower()
    if not key:
        raise KernelscopeError(
            f"no dataset given to {option}; pass wikitext2, c4, pileval, pydoc or a file path")
    if key in HUB_DATASETS:
        return _checked(key, HUB_DATASETS[key], _read_hub(key, max_chars, option))
    if key == "pydoc":
        return _checked("pydoc", "Python's own documentation topics (pydoc_data.topics), offline",
                        _read_pydoc())
    path = Path(source).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        try:
            return _read_local(source, path)
        except OtherEncodingError as exc:
            raise KernelscopeError(exc.advice(option, source, path)) from None
        except KernelscopeError as exc:
            raise KernelscopeError(f"{option}: {exc}") from None
    choices = ", ".join([*HUB_DATASETS, "pydoc"])
    raise KernelscopeError(f"unknown dataset {source!r} for {option}: choose {choices}, or a path to a "
                           ".txt/.jsonl/.parquet file")


def _read_local(source: str, path: Path) -> TextSource:
    if not path.exists():
        raise KernelscopeError(f"text file not found: {source}")
    if not path.is_file():
        raise KernelscopeError(f"{source} is not a file")
    suffix = path.suffix.lower()
    if suffix in STRUCTURED_SUFFIXES:
        raise KernelscopeError(f"{source} is {STRUCTURED_SUFFIXES[suffix]}, which would be read as its raw "
                               "text, markup and all; give the documents as .jsonl (one {\"text\": ...} a "
                               "line), .parquet (column text) or .txt")
    if suffix == ".jsonl":
        return _checked(source, f"local JSON lines file {path} (field 'text')", _read_jsonl(path))
    if suffix == ".parquet":
        return _checked(source, f"local parquet file {path} (column 'text')", _read_parquet(path))
    return _checked(source, f"local text file {path}, read whole", _read_txt(path))
