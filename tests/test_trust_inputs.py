"""Inputs that look right and are not, refused through the command line in one line that names the
option as typed and says what to do: a task file that does not parse, a task without documents, a
text file in UTF-16 or UTF-32."""

from __future__ import annotations

import codecs
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import MC_ITEMS, write_zeroshot_tasks
from tests.test_trust import assert_refused

needs_harness = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="the zeroshot extra is missing: pip install -e '.[test,zeroshot]'")

MC_BODY = ("output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
           "doc_to_target: '{{label}}'\n"
           "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
"""The scoring part of a multiple-choice task over ``MC_ITEMS``."""


# --- a task file that does not parse ------------------------------------------------------------


@needs_harness
@pytest.mark.parametrize("where", ["my_task.yaml", "extra/my_task.yaml"])
def test_a_task_file_that_does_not_parse_is_named_with_its_line(where, capsys, tmp_path, monkeypatch,
                                                                  tiny_llama_dir):
    """The harness's index skips a YAML file it cannot parse, and its task would be called unknown:
    the file is named as under the folder given, with the parser's line."""
    write_zeroshot_tasks(tmp_path / "tasks")
    bad = tmp_path / "tasks" / where
    bad.parent.mkdir(exist_ok=True)
    bad.write_text("task: my_task\ndataset_path: json\n  output_type: multiple_choice\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    line = assert_refused(
        capsys, ["zeroshot", str(tiny_llama_dir), "--tasks", "my_task", "--include-path", "tasks",
                 "--scheme", "fp", "-o", "out"],
        f"--include-path tasks: tasks/{where} is not valid YAML (line 3: mapping values are not allowed",
        tmp_path)
    assert "move it out of that folder" in line


# --- a task without documents -------------------------------------------------------------------


def _task(folder: Path, name: str, files: dict[str, str], *, split: str = "test_split: test",
          extra: str = "") -> None:
    """A multiple-choice task YAML over local JSON lines files (``files``: split -> file name)."""
    data = "".join(f"    {s}: {folder / f}\n" for s, f in files.items())
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{data}{split}\n{extra}{MC_BODY}",
        encoding="utf-8")


@pytest.fixture
def empty_tasks(tmp_path) -> Path:
    """Tasks with a split of no documents, in every way the data can come to have none."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "mc.jsonl").write_text("".join(json.dumps(item) + "\n" for item in MC_ITEMS), encoding="utf-8")
    (folder / "empty.jsonl").write_text("", encoding="utf-8")
    (folder / "utils.py").write_text("def drop_all(dataset):\n    return dataset.filter(lambda doc: False)\n",
                                     encoding="utf-8")
    _task(folder, "ks_empty_file", {"test": "empty.jsonl"})
    _task(folder, "ks_empty_test", {"train": "mc.jsonl", "test": "empty.jsonl"})
    _task(folder, "ks_empty_train", {"train": "empty.jsonl", "test": "mc.jsonl"})
    _task(folder, "ks_empty_validation", {"validation": "empty.jsonl"}, split="validation_split: validation")
    _task(folder, "ks_all_dropped", {"test": "mc.jsonl"}, extra="process_docs: !function utils.drop_all\n")
    _task(folder, "ks_full", {"test": "mc.jsonl"})
    (folder / "group.yaml").write_text("group: ks_group\ntask:\n  - ks_full\n  - ks_empty_file\n",
                                       encoding="utf-8")
    return folder


EMPTY = {
    "ks_empty_file": "task ks_empty_file (from --tasks ks_empty_file) has no documents in its test split, "
                     "the split it evaluates; give that split at least one document",
    "ks_empty_test": "task ks_empty_test (from --tasks ks_empty_test) has no documents in its test split, "
                     "the split it evaluates",
    "ks_empty_train": "task ks_empty_train (from --tasks ks_empty_train) has no documents in its train split "
                      "(it evaluates its test split)",
    "ks_empty_validation": "task ks_empty_validation (from --tasks ks_empty_validation) has no documents in "
                           "its validation split, the split it evaluates",
    "ks_all_dropped": "task ks_all_dropped (from --tasks ks_all_dropped) has no documents in its test split, "
                      "the split it evaluates (none that its process_docs keeps)",
    "ks_group": "task ks_empty_file (from --tasks ks_group) has no documents in its test split",
}


@needs_harness
@pytest.mark.parametrize("task", list(EMPTY))
def test_a_task_without_documents_names_the_task_and_split(task, capsys, tmp_path, monkeypatch,
                                                           tiny_llama_dir, empty_tasks):
    """An empty data file, an empty split beside a full one, a process_docs that keeps nothing (its
    ``!function`` tag passes the check of the folder's YAML), a group with such a task: never the
    loader's internal error."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # utils.py is imported from the task folder
    args = ["zeroshot", str(tiny_llama_dir), "--tasks", task, "--include-path", str(empty_tasks),
            "--scheme", "fp", "-o", str(tmp_path / "out")]
    assert_refused(capsys, args, EMPTY[task], tmp_path)


# --- text in UTF-16 or UTF-32 -------------------------------------------------------------------

PROSE = "Un café au lait, s'il vous plaît: the menu reads the same in both tongues.\n" * 40
ENCODED = {
    "UTF-16 with its mark": ("notes.txt", PROSE.encode("utf-16-le"), codecs.BOM_UTF16_LE,
                             ("UTF-16 (little-endian) text; kernelscope reads UTF-8: convert it with "
                              "iconv -f UTF-16 -t UTF-8 notes.txt > notes-utf8.txt")),
    "UTF-16 without a mark": ("notes.txt", PROSE.encode("utf-16-be"), b"",
                              ("UTF-16 (big-endian) text; kernelscope reads UTF-8: convert it with "
                               "iconv -f UTF-16BE -t UTF-8 notes.txt > notes-utf8.txt")),
    "UTF-16 of no Latin text": ("notes.txt", ("日本語の文章。" * 40).encode("utf-16-be"), codecs.BOM_UTF16_BE,
                                ("UTF-16 (big-endian) text; kernelscope reads UTF-8: convert it with "
                                 "iconv -f UTF-16 -t UTF-8 notes.txt > notes-utf8.txt")),
    "UTF-32 JSON lines": ("my notes.jsonl", (json.dumps({"text": PROSE}) + "\n").encode("utf-32-le"), b"",
                          ("UTF-32 (little-endian) text; kernelscope reads UTF-8: convert it with "
                           "iconv -f UTF-32LE -t UTF-8 'my notes.jsonl' > 'my notes-utf8.jsonl'")),
}
"""A file name, its bytes, the byte-order mark before them, and what the refusal says of it."""


@pytest.mark.parametrize("case", list(ENCODED))
def test_text_in_utf16_or_utf32_says_how_to_convert_it(case, capsys, tmp_path, monkeypatch, tiny_llama_dir):
    """Not "a binary file": the encoding it looks like (by its byte-order mark, else by where its NULs
    are) and the iconv command that makes it UTF-8, for the option as typed (-d here)."""
    name, data, mark, message = ENCODED[case]
    (tmp_path / name).write_bytes(mark + data)
    monkeypatch.chdir(tmp_path)
    assert_refused(capsys, ["profile", str(tiny_llama_dir), "-d", name, "-n", "2", "-s", "32", "-o", "out"],
                   f"-d {name} looks like {message}", tmp_path)


@needs_harness
def test_calibration_text_in_utf32_names_calib_dataset(capsys, tmp_path, monkeypatch, tiny_llama_dir,
                                                       zeroshot_tasks):
    (tmp_path / "calib.txt").write_bytes(codecs.BOM_UTF32_BE + PROSE.encode("utf-32-be"))
    monkeypatch.chdir(tmp_path)
    assert_refused(capsys, ["zeroshot", str(tiny_llama_dir), "--tasks", "ks_mc", "--include-path",
                            str(zeroshot_tasks), "--scheme", "w8a8-smoothquant",
                            "--calib-dataset", "calib.txt", "-o", "out"],
                   "--calib-dataset calib.txt looks like UTF-32 (big-endian) text; kernelscope reads UTF-8: "
                   "convert it with iconv -f UTF-32 -t UTF-8 calib.txt > calib-utf8.txt", tmp_path)
