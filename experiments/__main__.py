"""``python -m experiments <study> [options]`` or ``python -m experiments quick``: see
:mod:`experiments.runner`."""

import sys

from experiments.runner import STUDIES, main  # noqa: F401  (STUDIES: the registry, re-exported)

if __name__ == "__main__":
    sys.exit(main())
