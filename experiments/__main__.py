"""``python -m experiments <study> [options]``, ``python -m experiments quick`` or
``python -m experiments pages RUN_DIR``: see :mod:`experiments.runner`."""

import sys

from experiments.runner import STUDIES, main  # noqa: F401  (STUDIES: the registry, re-exported)

if __name__ == "__main__":
    sys.exit(main())
