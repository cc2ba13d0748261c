"""Zero-shot tasks of lm-evaluation-harness: found by name, their data read before any model loads.

The harness is an optional dependency (``pip install 'kernelscope[zeroshot]'``); :func:`require_harness`
says how to install it. A task's data come from the Hugging Face hub (its YAML names a dataset there)
or from local files (a YAML of one's own, ``dataset_path: json`` with ``data_files``, found through
``include_path``). Without a network a hub task is refused at once with what it needs and the two ways
to make it available: a filled Hugging Face cache read with ``HF_DATASETS_OFFLINE=1``, or a local
task definition.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.metadata
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernelscope.errors import KernelscopeError
from kernelscope.hub import hub_unreachable_reason

INSTALL_HINT = "pip install 'kernelscope[zeroshot]'"
SCORED_OUTPUT_TYPES = ("multiple_choice", "loglikelihood")
"""Task kinds scored from the log-likelihood of given continuations: each request is one forward pass
over its whole sequence (context and continuation), so a per-sequence scale sees the whole request."""
ACCURACY_METRICS = ("acc", "acc_norm")
"""The harness's accuracy metrics (the share of items whose right answer scored best), reported
with their standard error."""
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
"""``dataset_path`` values that read local files (``data_files``) rather than a hub dataset."""
IGNORED_DIRS = ("__pycache__", ".ipynb_checkpoints")
"""Folders whose YAML files the harness's task index skips."""
EMPTY_SPLIT = re.compile(r'Instruction "([^"]+)" corresponds to no data')
"""How datasets says a split it was asked for has no rows."""
EMPTY_EVAL = "Invalid key: 0 is out of bounds for size 0"
"""How the harness's task fails when the documents it evaluates are none (it reads the first one)."""


def require_harness() -> str:
    """The installed lm-evaluation-harness version; a one-line error that says how to install it."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise KernelscopeError(
            f"kernelscope zeroshot runs lm-evaluation-harness, an optional extra that is not installed: "
            f"{INSTALL_HINT}") from None
    if not hasattr(TaskManager, "load"):
        raise KernelscopeError(f"lm-evaluation-harness {importlib.metadata.version('lm_eval')} is older than "
                               f"kernelscope needs; {INSTALL_HINT}")
    return importlib.metadata.version("lm_eval")


@dataclass
class HarnessTasks:
    """The harness's tasks named by the user, loaded with their data.

    ``tasks`` maps each task to the harness's task object (a group or tag is expanded to its tasks);
    ``facts`` describe each one for the run summary: where its data come from, its output type,
    its accuracy metrics, its document count and a SHA-256 of its evaluation documents.
    """

    names: list[str]
    tasks: dict[str, Any]
    facts: list[dict[str, Any]]
    include_path: str | None
    harness_version: str
    manager: Any = field(repr=False, default=None)

    def fact(self, task: str) -> dict[str, Any]:
        return next(f for f in self.facts if f["task"] == task)

    def metrics(self, task: str) -> list[str]:
        return self.fact(task)["metrics"]

    @property
    def fixed_zero_shot(self) -> list[str]:
        """Tasks whose definition fixes the few-shot count at 0 (the harness keeps that over any other)."""
        return [f["task"] for f in self.facts if f["config_num_fewshot"] == 0]


def load_tasks(names: Sequence[str], include_path: str | Path | None = None, *,
               option: str = "--tasks", path_option: str = "--include-path") -> HarnessTasks:
    """Find and load ``names`` (tasks, groups or tags of the harness, or of the YAML files under
    ``include_path``), with their data. ``option`` and ``path_option`` are how errors name the
    options that gave them.
    """
    version = require_harness()
    if not names:
        raise KernelscopeError(f"{option} needs at least one task")
    folder = _checked_folder(include_path, path_option)
    if folder is not None:
        _check_yaml_files(folder, str(include_path), path_option)
    manager = _manager(names, folder, option, path_option)
    _check_hub_reachable(manager, names, path_option)
    tasks: dict[str, Any] = {}
    requested: dict[str, str] = {}
    unavailable: list[tuple[str, str, str]] = []  # (task, dataset, why) of every task without its data
    with _datasets_quiet():
        for name in dict.fromkeys(names):
            try:
                loaded = _load_one(manager, name, option)
            except _Unavailable as exc:
                unavailable.append(exc.missing)
                continue
            for task_name, task in loaded.items():
                tasks.setdefault(task_name, task)
                requested.setdefault(task_name, name)
        if unavailable:  # every task without its data named at once, not one a run
            raise KernelscopeError(_unavailable(unavailable, path_option))
        facts = [_facts(task_name, task, requested[task_name], option) for task_name, task in tasks.items()]
    return HarnessTasks(list(dict.fromkeys(names)), tasks, facts, str(folder) if folder else None, version,
                        manager)


@contextlib.contextmanager
def _datasets_quiet() -> Iterator[None]:
    """datasets' own progress bars off while tasks load (each split it prepares draws one on stderr, around
    a command's one-line refusal), on again after where they were on."""
    import datasets

    was_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def _checked_folder(include_path: str | Path | None, path_option: str) -> Path | None:
    if include_path is None:
        return None
    folder = Path(include_path).expanduser()
    if not folder.exists():
        raise KernelscopeError(f"{path_option} {include_path}: no such folder; give the folder that holds "
                               "your task YAML files")
    if not folder.is_dir():
        raise KernelscopeError(f"{path_option} {include_path} is not a folder; give the folder that holds "
                               "your task YAML files")
    return folder.resolve()


def _check_yaml_files(folder: Path, given: str, path_option: str) -> None:
    """Refuse a YAML file under ``folder`` that does not parse, named as under the folder the user
    gave (``given``): the harness's index skips such a file without a word, and its task would then
    be reported as unknown."""
    import yaml

    loader = _syntax_loader()
    for path in _task_yaml_files(folder):
        try:
            with path.open("rb") as fh:
                yaml.load(fh, Loader=loader)  # a safe loader that reads every tag as null
        except yaml.YAMLError as exc:
            shown = Path(given) / path.relative_to(folder)
            raise KernelscopeError(
                f"{path_option} {given}: {shown} is not valid YAML ({_yaml_problem(exc)}); correct it, or "
                "move it out of that folder (the harness reads every .yaml file under it)") from None


def _task_yaml_files(folder: Path) -> list[Path]:
    """The ``.yaml`` files the harness's task index reads under ``folder``, in its order."""
    files = (p for p in folder.rglob("*.yaml")
             if p.is_file() and not any(part in IGNORED_DIRS for part in p.relative_to(folder).parts))
    return sorted(files, key=lambda p: p.as_posix())


@functools.cache
def _syntax_loader() -> type:
    """A safe YAML loader that reads any local tag (the harness's ``!function``) as null, so that only
    the syntax of a task file is checked and none of its code is imported."""
    import yaml

    class SyntaxLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        pass

    SyntaxLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return SyntaxLoader


def _yaml_problem(exc: Exception) -> str:
    """The parser's complaint with its line (1-based), where it has one."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    if mark is None or not problem:
        return _first_line(exc)
    return f"line {mark.line + 1}: {problem}"


def _manager(names: Sequence[str], folder: Path | None, option: str, path_option: str):
    """The harness's task index: the local folder alone when it defines every name (indexing the
    harness's own thousands of tasks takes seconds), else the harness's tasks and the folder's."""
    from lm_eval.tasks import TaskManager

    if folder is not None:
        local = TaskManager(include_path=str(folder), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    manager = _full_index(str(folder) if folder else None, _yaml_fingerprint(folder))
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            near = f"; did you mean {', '.join(close)}?" if close else ""
            where = (f"none of the YAML files under {path_option} {folder} defines it" if folder
                     else f"for a task of your own, pass the folder of its YAML with {path_option} DIR")
            raise KernelscopeError(f"unknown task {name!r} in {option}{near} (the harness knows "
                                   f"{len(manager.all_tasks):,} tasks, groups and tags; {where})")
    return manager


@functools.lru_cache(maxsize=4)
def _full_index(folder: str | None, fingerprint: tuple) -> Any:
    """The harness's tasks and the folder's, indexed once per process while the folder's YAML files
    (``fingerprint``) stay as they were."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=folder)


def _yaml_fingerprint(folder: Path | None) -> tuple:
    """Each YAML file under ``folder`` with its size and modification time."""
    if folder is None:
        return ()
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


class _Unavailable(Exception):
    """A task whose data the hub holds and this machine cannot have: ``missing`` is (task, dataset, why)."""

    def __init__(self, task: str, dataset: str, why: str) -> None:
        super().__init__(task)
        self.missing = (task, dataset, why)


def _check_hub_reachable(manager, names: Sequence[str], path_option: str) -> None:
    """Refuse at once, naming every one of them, the tasks whose data are on the hub where the hub cannot
    be reached (outside offline mode the harness would retry for half a minute per task)."""
    if _datasets_offline():
        return
    needed = list(dict.fromkeys(pair for name in dict.fromkeys(names)
                                for pair in _hub_datasets(manager, name)))
    reason = hub_unreachable_reason() if needed else None
    if reason is not None:
        missing = [(task, dataset, reason) for task, dataset in needed]
        raise KernelscopeError(_unavailable(missing, path_option))


def _load_one(manager, name: str, option: str) -> dict[str, Any]:
    """The tasks ``name`` stands for, loaded; data that cannot be had raise :class:`_Unavailable`, a
    split without documents is named."""
    offline = _datasets_offline()
    try:
        return manager.load([name])["tasks"]
    except ConnectionError as exc:
        reason = ("offline mode is on and the Hugging Face cache does not hold it" if offline
                  else _first_line(exc))
        task, dataset = next(_hub_datasets(manager, name), None) or (name, "its data")
        raise _Unavailable(task, dataset, reason) from None
    except Exception as exc:  # the harness and datasets raise many types for a bad task file or data
        if _is_empty_split(exc):
            raise KernelscopeError(_no_documents_at_load(manager, name, exc, option)) from None
        raise KernelscopeError(
            f"cannot load task {name!r}: {type(exc).__name__}: {_first_line(exc)}") from None


def _is_empty_split(exc: Exception) -> bool:
    """Whether loading failed for a split without documents: datasets says so for the split it was asked
    for, its JSON reader stops (``StopIteration``) on an empty first data file while guessing the columns,
    and the harness fails to read the first document it evaluates (none left after ``process_docs``)."""
    return isinstance(exc, StopIteration) or bool(EMPTY_SPLIT.search(str(exc))) or EMPTY_EVAL in str(exc)


def _empty_split_name(exc: Exception, cfg: dict) -> str | None:
    """The split that has no documents, as far as the failure tells."""
    found = EMPTY_SPLIT.search(str(exc))
    if found:
        return found.group(1)
    return _first_data_split(cfg) if isinstance(exc, StopIteration) else _evaluated_split(cfg)


def _no_documents_at_load(manager, name: str, exc: Exception, option: str) -> str:
    """Which task under ``name`` has a split without documents, and which split that is."""
    leaves = list(_leaf_configs(manager, name, set()))
    task, cfg = leaves[0] if len(leaves) == 1 else _failing_leaf(manager, leaves) or (name, {})
    filtered = EMPTY_EVAL in str(exc) and bool(cfg.get("process_docs"))
    return _no_documents_message(task, name, option, _empty_split_name(exc, cfg), _evaluated_split(cfg),
                                 filtered=filtered)


def _failing_leaf(manager, leaves: list[tuple[str, dict]]) -> tuple[str, dict] | None:
    """The first of a group's tasks that fails to load for a split without rows."""
    for task, cfg in leaves:
        try:
            manager.load([task])
        except Exception as exc:  # as in _load_one
            if _is_empty_split(exc):
                return task, cfg
    return None


def _first_data_split(cfg: dict) -> str | None:
    """The split of the first of a task's local data files (datasets reads it first)."""
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        return next(iter(files), None)
    return "train" if files else None  # datasets names the split of unnamed files "train"


def _evaluated_split(cfg: dict) -> str | None:
    """The split the harness scores: the test split where the task names one, else the validation split."""
    return cfg.get("test_split") or cfg.get("validation_split")


def _no_documents_message(task: str, requested: str, option: str, split: str | None,
                          evaluated: str | None, *, filtered: bool = False) -> str:
    """The refusal of a task with a split that holds no documents (``filtered``: none that its
    ``process_docs`` keeps)."""
    fix = "point the task's YAML (test_split, validation_split, data_files) at a split that has some"
    if split is None:
        return (f"task {task} (from {option} {requested}) has a data file without documents; give each of "
                f"its data files at least one document, or {fix}")
    if split == evaluated or evaluated is None:
        where = f"in its {split} split, the split it evaluates" + (
            " (none that its process_docs keeps)" if filtered else "")
    else:
        where = f"in its {split} split (it evaluates its {evaluated} split)"
    return (f"task {task} (from {option} {requested}) has no documents {where}; give that split at least "
            f"one document, or {fix}")


def _datasets_offline() -> bool:
    """Whether datasets reads only its cache (HF_DATASETS_OFFLINE or HF_HUB_OFFLINE set)."""
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def _unavailable(missing: Sequence[tuple[str, str, str]], path_option: str) -> str:
    """The refusal of the tasks whose data cannot be had, ``(task, dataset, why)`` each: every one named,
    with the two ways to make them available."""
    if len(missing) == 1:
        task, dataset, reason = missing[0]
        return (f"task {task} needs {dataset} from the Hugging Face hub, which cannot be reached ({reason}); "
                "make it available: run once where the hub is reachable (that fills the Hugging Face "
                "cache), then offline with HF_DATASETS_OFFLINE=1 and the same HF_HOME; or define the task in "
                "a YAML of your own whose data are local files (dataset_path: json, with data_files) and "
                f"pass its folder with {path_option} DIR")
    named = ", ".join(f"{task} needs {dataset.removeprefix('the dataset ')}" for task, dataset, _ in missing)
    reasons = "; ".join(dict.fromkeys(reason for _, _, reason in missing))
    return (f"{len(missing)} tasks need their data from the Hugging Face hub, which cannot be reached "
            f"({reasons}): {named}; make them available: run once where the hub is reachable (that fills "
            "the Hugging Face cache), then offline with HF_DATASETS_OFFLINE=1 and the same HF_HOME; or "
            "define the tasks in YAML files of your own whose data are local files (dataset_path: json, "
            f"with data_files) and pass their folder with {path_option} DIR")


def _hub_datasets(manager, name: str) -> Iterator[tuple[str, str]]:
    """``(task, "the dataset org/name (config)")`` for every task under ``name`` whose data the index
    says live on the hub (a local builder or an existing path does not count)."""
    for task, cfg in _leaf_configs(manager, name, set()):
        path = cfg.get("dataset_path")
        if not isinstance(path, str) or path in LOCAL_BUILDERS or Path(path).expanduser().exists():
            continue
        config = cfg.get("dataset_name")
        yield task, f"the dataset {path}" + (f" ({config})" if config else "")


def _leaf_configs(manager, name: str, seen: set[str]) -> Iterator[tuple[str, dict]]:
    """The index's configuration of every task a name stands for (tags and groups followed)."""
    entry = manager.task_index.get(name)
    if entry is None or name in seen:
        return
    seen.add(name)
    if name in manager.all_tags:
        for member in sorted(entry.tags):
            yield from _leaf_configs(manager, member, seen)
    elif name in manager.all_groups:
        members = (entry.cfg or {}).get("task") or []
        for member in members if isinstance(members, list) else [members]:
            if isinstance(member, str):
                yield from _leaf_configs(manager, member, seen)
            elif isinstance(member, dict) and isinstance(member.get("task"), str):
                if "dataset_path" in member:
                    yield member["task"], member
                else:
                    yield from _leaf_configs(manager, member["task"], seen)
    else:
        yield name, entry.cfg or {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _facts(name: str, task, requested: str, option: str) -> dict[str, Any]:
    """What the summary records of one task; a task kernelscope cannot score is refused here."""
    output_type = task.get_config("output_type")
    if output_type not in SCORED_OUTPUT_TYPES:
        raise KernelscopeError(
            f"task {name} (from {option} {requested}) is a {output_type} task; kernelscope zeroshot scores "
            f"{' and '.join(SCORED_OUTPUT_TYPES)} tasks, whose every request is one forward pass over "
            "its whole sequence")
    metrics = [m for m in ACCURACY_METRICS if m in task.aggregation()]
    if not metrics:
        raise KernelscopeError(
            f"task {name} (from {option} {requested}) reports no accuracy (its metrics: "
            f"{', '.join(task.aggregation()) or 'none'}); kernelscope zeroshot reports "
            f"{', '.join(ACCURACY_METRICS)}")
    docs = list(task.eval_docs)
    config = task.config
    if not docs:
        split = config.test_split if task.has_test_docs() else config.validation_split
        raise KernelscopeError(_no_documents_message(name, requested, option, split, split))
    return {
        "task": name, "requested_as": requested, "output_type": output_type, "metrics": metrics,
        "dataset_path": config.dataset_path, "dataset_name": config.dataset_name,
        "source": (config.metadata or {}).get("config_source"),
        "version": (config.metadata or {}).get("version"),
        "config_num_fewshot": task.get_config("num_fewshot"),
        "documents": len(docs), "documents_sha256": documents_sha256(docs),
    }


def documents_sha256(docs: Sequence[Any]) -> str:
    """A fingerprint of a task's evaluation documents, in order, so two runs can tell whether they
    scored the same items."""
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(json.dumps(doc, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
