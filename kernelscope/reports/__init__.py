"""The self-contained HTML report: plotly figures and tables built from run folders."""

from kernelscope.reports.html import build_report, stage_report, write_report

__all__ = ["build_report", "stage_report", "write_report"]
