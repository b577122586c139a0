"""`python -m flashzo` runs the `flashzo` command."""

import os
import sys

# `python -m` puts the working directory on sys.path; from a flashzo checkout its kernels/ folder would
# shadow the PyPI package `kernels` that transformers probes for.
_here = os.path.abspath(os.curdir)
if os.path.isfile(os.path.join(_here, "kernels", "__init__.py")) and os.path.isfile(
        os.path.join(_here, "pyproject.toml")):
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

try:
    from flashzo.cli import main
except KeyboardInterrupt:  # Ctrl-C before main runs: one line, as main says it
    print("flashzo: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
