"""The studies behind structngd's results: ``python -m experiments <study> [options]``, ``quick`` (all of
them, one report) and ``pages RUN_DIR`` (documentation pages), from a clone of the repository. Each study
module exposes ``add_arguments(parser)`` and ``run(args)`` and is registered in
:data:`experiments.runner.STUDIES`; the docs' studies page describes them."""
