"""python -m flashzo.sglang install | uninstall | status: the start-up shim's .pth file (boot.py).

SGLang's registry imports every module of this package, this one included: it acts only when run.
"""

import sys

if __name__ == "__main__":
    from flashzo.sglang.boot import main

    sys.exit(main())
