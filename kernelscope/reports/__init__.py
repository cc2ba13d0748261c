"""Figures and the self-contained HTML report (reads run folders written by ``kernelscope.results``)."""
