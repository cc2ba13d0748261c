"""``python -m kernelscope`` is the ``kernelscope`` command."""

from kernelscope.cli import run

if __name__ == "__main__":
    run()
