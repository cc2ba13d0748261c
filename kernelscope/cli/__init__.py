"""The ``kernelscope`` command line: the only layer that prints."""

from kernelscope.cli.app import app, main, run

__all__ = ["app", "main", "run"]
