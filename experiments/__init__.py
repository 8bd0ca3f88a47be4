"""Studies that produce structngd's results tables and plots.

Run one with ``python -m experiments <study> [options]`` from a clone of the repository
(``python -m experiments -h`` lists them; ``python -m experiments quick`` runs them all and
writes one report; ``python -m experiments pages RUN_DIR`` turns a finished run into
documentation pages). Each study is a module with ``add_arguments(parser)`` and ``run(args)``,
registered in :data:`experiments.runner.STUDIES`; :mod:`experiments.common` holds the helpers
they share (timing, evaluation schedules, tables, plots, output files) and
:mod:`experiments.progress` their progress bars.
"""
