"""The command lines of ``jaxembed export``, ``search`` and ``cluster``: flags, checks, output.

Each module here defines its command's flags and imports the library that
does the work (jaxembed.export, .search, .cluster: JAX, Flax, scikit-learn;
2.5-3.8 s) only once the flags have parsed, so that ``--help`` and a
mistyped flag answer at once. ``jaxembed.main`` registers the commands;
``jaxembed.train`` is training's command line (the only one that may
import the trainer, tests/layering_test.py).
"""
