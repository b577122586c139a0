"""Start-up shim that lets SGLang import on a machine without torchvision (CPU installs).

SGLang 0.5.23 imports torchvision at import time from modules every process loads
(`sglang/srt/configs/__init__.py` -> `configs/nano_nemotron_vl.py` -> `multimodal/internvl_utils.py`,
and `configs/deepseek_ocr.py`), and PyPI has no CPU build of torchvision for torch 2.13. A text-only
OPT never calls those functions, so a stand-in is enough, provided nothing else mistakes it for the
real package:

- the finder sits at the END of sys.meta_path: it is asked only after every real finder missed,
  so an installed torchvision always wins;
- it answers only imports made by `sglang.*` modules (and submodules of its own stand-in); anyone
  else asking for torchvision (`importlib.util.find_spec`, `try: import torchvision`) still sees
  it missing;
- before the stand-in first enters sys.modules, transformers' cached `is_torchvision_available()`
  is evaluated (False), so transformers never routes image processing to the stand-in;
- every attribute of the stand-in is a placeholder that raises ImportError when called.

This module imports nothing heavy (no torch, no sglang), because SGLang's worker processes must
run it before their first `import sglang`. Three ways in:

    import flashzo.sglang                   in your own process, before `import sglang`
    python -m flashzo.sglang install        writes a .pth file into site-packages so every Python
                                            started with SGLANG_EXTERNAL_MODEL_PACKAGE=flashzo.sglang
                                            (SGLang's spawned workers, `python -m
                                            sglang.launch_server`) runs `install()` at start-up
    python -m flashzo.sglang status         says whether the .pth is there and what it runs
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import sysconfig
import types

PLUGIN_PACKAGE = "flashzo.sglang"
ENV_VAR = "SGLANG_EXTERNAL_MODEL_PACKAGE"
PTH_NAME = "flashzo_sglang_boot.pth"
_MARK = "_flashzo_torchvision_stub"
_IMPORTLIB_INIT = os.path.join("importlib", "__init__.py")


class _Placeholder:
    """Any torchvision attribute: attribute access chains, calling it raises ImportError."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise ImportError(f"{self._name} needs torchvision, which is not installed (flashzo's SGLang plugin "
                          "stands in for it so SGLang imports on a CPU; install torchvision to use it)")

    def __repr__(self) -> str:
        return f"<torchvision stand-in {self._name}>"


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self.__name__}.{attr}")


def _importer_name() -> str:
    """__name__ of the module whose import statement is being served (import machinery skipped)."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (filename.startswith("<frozen importlib") or filename.endswith(_IMPORTLIB_INIT)):
            return str(frame.f_globals.get("__name__", ""))
        frame = frame.f_back
    return ""


class TorchvisionStubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves a torchvision stand-in to `sglang.*` importers when no real torchvision exists."""

    _flashzo_torchvision_stub = True

    def __init__(self):
        self._priming = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision" and not fullname.startswith("torchvision."):
            return None
        if self._priming:
            return None
        if fullname == "torchvision" and not _importer_name().startswith("sglang."):
            return None
        if fullname != "torchvision" and not isinstance(sys.modules.get("torchvision"), _StubModule):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        if spec.name == "torchvision":
            self._prime_transformers()
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []
        module.__flashzo_stub__ = True

    def _prime_transformers(self) -> None:
        # Cache transformers' answer (False) while the finder still declines, so the stand-in in
        # sys.modules never makes transformers believe torchvision is installed.
        self._priming = True
        try:
            from transformers.utils import import_utils
        except Exception:  # transformers absent or broken: nothing to prime
            return
        finally:
            self._priming = False
        self._priming = True
        try:
            for name in ("is_torchvision_available", "is_torchvision_v2_available"):
                fn = getattr(import_utils, name, None)
                if fn is not None:
                    fn()
        finally:
            self._priming = False


def installed_finder() -> TorchvisionStubFinder | None:
    for finder in sys.meta_path:
        if getattr(finder, _MARK, False):
            return finder
    return None


def install() -> None:
    """Append the torchvision stand-in finder to sys.meta_path (idempotent, never shadows a real one)."""
    if installed_finder() is None:
        sys.meta_path.append(TorchvisionStubFinder())


# --------------------------------------------------------------------------------------------------
# The .pth file that runs install() at interpreter start-up in SGLang's processes
# --------------------------------------------------------------------------------------------------

def pth_path() -> str:
    return os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)


def pth_line(boot_file: str | None = None) -> str:
    """One .pth line: in a process started with SGLANG_EXTERNAL_MODEL_PACKAGE=flashzo.sglang, run this
    file as a plain script (so no package, torch or sglang is imported at start-up)."""
    boot_file = os.path.abspath(boot_file or __file__)
    return (f"import os, runpy; os.environ.get({ENV_VAR!r}, '').strip() == {PLUGIN_PACKAGE!r} and "
            f"os.path.isfile({boot_file!r}) and runpy.run_path({boot_file!r}, run_name='flashzo_sglang_boot')\n")


def write_pth(path: str | None = None) -> str:
    path = path or pth_path()
    with open(path, "w") as f:
        f.write(pth_line())
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flashzo.sglang",
                                     description="Install the start-up shim that lets SGLang's processes "
                                                 "import without torchvision (CPU installs).")
    parser.add_argument("action", choices=("install", "uninstall", "status"),
                        help="install: write the .pth file; uninstall: remove it; status: show it")
    parser.add_argument("--pth", default=None, help=f"where the .pth goes (default: {pth_path()})")
    args = parser.parse_args(argv)
    path = args.pth or pth_path()
    if args.action == "install":
        print(f"wrote {write_pth(path)}")
    elif args.action == "uninstall":
        if os.path.exists(path):
            os.remove(path)
            print(f"removed {path}")
        else:
            print(f"{path} does not exist")
    else:
        if not os.path.exists(path):
            print(f"{path} does not exist: run `python -m flashzo.sglang install`")
            return 1
        with open(path) as f:
            text = f.read()
        print(f"{path}:\n{text}", end="")
        if text != pth_line():
            print(f"stale: it does not run this installation's {os.path.abspath(__file__)}; "
                  "run `python -m flashzo.sglang install`")
            return 1
        print("up to date")
    return 0


if __name__ == "flashzo_sglang_boot":  # run from the .pth line at interpreter start-up
    install()
