"""Text sources and the windows of tokens a run feeds the model; zero-shot tasks of the harness."""

from kernelscope.data.tasks import HarnessTasks, load_tasks
from kernelscope.data.text import HUB_DATASETS, TextSource, load_text
from kernelscope.data.windows import Windows, make_windows, tokenize

__all__ = ["HUB_DATASETS", "HarnessTasks", "TextSource", "Windows", "load_tasks", "load_text", "make_windows",
           "tokenize"]
