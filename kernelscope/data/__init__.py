"""Text sources and the windows of tokens a run feeds the model."""

from kernelscope.data.text import HUB_DATASETS, TextSource, load_text
from kernelscope.data.windows import Windows, make_windows, tokenize

__all__ = ["HUB_DATASETS", "TextSource", "Windows", "load_text", "make_windows", "tokenize"]
