"""Studies that produce structngd's results tables and plots.

Run one with ``python -m experiments <study> [options]`` (``python -m experiments -h`` lists
them). Each study is a module with ``add_arguments(parser)`` and ``run(args)``, registered in
:data:`experiments.runner.STUDIES`; :mod:`experiments.common` holds the helpers they share
(timing, evaluation schedules, tables, plots, output files).
"""
