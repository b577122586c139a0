"""MkDocs hooks (mkdocs.yml): the packages where mkdocstrings reads them, and bench/results in the site.

pyproject.toml installs kernels/, engine/ and sglang_plugin/ as flashzo.kernels, flashzo.engine and
flashzo.sglang (its package-dir); mkdocstrings' static reader (griffe) only looks for a subpackage in
its parent's folder. `on_config` lays flashzo out as it is installed, with symlinks, under
build/mkdocs-api (git-ignored), the path mkdocs.yml gives mkdocstrings.

The pages link a result as ../bench/results/<file>, which resolves in the checkout and on GitHub.
`on_files` adds every result file to the site at bench/results/<file> under that same name, so the
links resolve in the site too; the Markdown tables become pages.
"""

from __future__ import annotations

import shutil
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, InclusionLevel

API_TREE = Path("build") / "mkdocs-api"
RESULTS = Path("bench") / "results"


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def package_dirs(root: Path) -> dict[str, Path]:
    """pyproject.toml's package-dir: the installed package name -> its folder in the checkout."""
    with open(root / "pyproject.toml", "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {name: (root / folder).resolve() for name, folder in mapping.items()}


def lay_out_packages(root: Path, out: Path) -> None:
    """Symlinks under `out` that put every package where its installed name says (parents first)."""
    shutil.rmtree(out, ignore_errors=True)  # removes the links, never what they point at
    for name, folder in sorted(package_dirs(root).items(), key=lambda item: item[0].count(".")):
        target = out.joinpath(*name.split("."))
        if "." not in name:  # a top-level package: a real folder, so its subpackages can be added to it
            target.mkdir(parents=True)
            for entry in folder.iterdir():
                if entry.name != "__pycache__":
                    (target / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
        else:
            target.symlink_to(folder, target_is_directory=True)


def result_files(root: Path) -> list[Path]:
    """The result files the pages may link: bench/results/*, less what a --smoke run writes."""
    return sorted(p for p in (root / RESULTS).iterdir() if p.is_file() and "_smoke." not in p.name)


@event_priority(100)  # before mkdocstrings' on_config, which reads the path
def on_config(config):
    root = _root(config)
    lay_out_packages(root, root / API_TREE)
    return config


def on_files(files, config):
    root = _root(config)
    for path in result_files(root):
        f = File.generated(config, f"../{RESULTS.as_posix()}/{path.name}", abs_src_path=str(path),
                           inclusion=InclusionLevel.INCLUDED)
        dest = f"{RESULTS.as_posix()}/{path.name}"
        if path.suffix == ".md":
            dest = dest[: -len(".md")] + ("/index.html" if config.use_directory_urls else ".html")
        f.dest_uri = dest
        files.append(f)
    return files
