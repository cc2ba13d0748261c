"""Run folders: tables as parquet, a JSON summary, written atomically and read back with checks."""

from kernelscope.results.paths import check_output_dir, check_report_file, is_kernelscope_report
from kernelscope.results.run_dir import (
    SCHEMA_VERSION,
    RunFolder,
    Staged,
    default_mode,
    json_safe,
    read_run,
    to_json,
    write_run,
)

__all__ = ["SCHEMA_VERSION", "RunFolder", "Staged", "check_output_dir", "check_report_file", "default_mode",
           "is_kernelscope_report", "json_safe", "read_run", "to_json", "write_run"]
