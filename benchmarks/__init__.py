"""Benchmarks and studies: thin command-line drivers over the library (``python benchmarks/NAME.py --help``).

Importable as a package (``import benchmarks.ci_latency``) so that tests call the drivers' functions and ``main``
like any other module; results they write go to ``benchmarks/results/``.
"""
