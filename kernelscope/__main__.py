"""``python -m kernelscope`` is the ``kernelscope`` command."""

from kernelscope.cli import main

if __name__ == "__main__":
    main()
