"""The README and the docs site: a front page that opens with the commands CI runs, links that resolve,
every public name documented, and code that runs as written.

The README's Python blocks run in a fresh process in a temporary directory; its `flashzo` commands
run when they ask for --help and are parsed by the command's own parser otherwise (a demo, a training
run or a server is CI's or the user's to run); `mkdocs build --strict` runs where mkdocs is installed.
"""

import ast
import importlib
import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
API = DOCS / "api"
RESULTS = ROOT / "bench" / "results"
MAX_README_LINES = 250
# the modules whose every public name (their __all__) the API reference documents
PUBLIC_MODULES = ("flashzo", "flashzo.engine", "flashzo.kernels")
# what the README's shell blocks may run: the test runs or parses the flashzo and `python -c` ones
SHELL_COMMANDS = {"pip", "pytest", "flashzo", "python", "cd", "curl"}


# --------------------------------------------------------------------------------------------------
# Reading Markdown


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line of the opening fence) of every ``` block."""
    blocks, lang, body, start = [], None, [], 0
    for n, line in enumerate(text.splitlines(), 1):
        if lang is None and line.startswith("```"):
            lang, body, start = line[3:].strip(), [], n
        elif lang is not None and line.startswith("```"):
            blocks.append((lang, "\n".join(body) + "\n", start))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"a ``` block opened at line {start} is never closed"
    return blocks


def prose_lines(text: str, *, strip_code: bool = True) -> list[tuple[int, str]]:
    """The lines outside fenced and indented code blocks (inline code removed unless strip_code=False)."""
    out, fenced, previous_blank = [], False, True
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        indented = line.startswith("    ") and previous_blank
        previous_blank = not line.strip() or (indented and previous_blank)
        if fenced or indented:
            continue
        out.append((n, re.sub(r"`[^`]*`", "", line) if strip_code else line))
    return out


def headings(text: str) -> list[str]:
    return [line.lstrip("#").strip() for _, line in prose_lines(text, strip_code=False) if re.match(r"#{1,6} ", line)]


def heading_text(heading: str) -> str:
    """A heading as both renderers see its text: links by their text, no code ticks or emphasis."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return heading.replace("`", "").replace("*", "")


def slug(heading: str) -> str:
    """The anchor MkDocs gives a heading (Python-Markdown's toc slugify)."""
    value = unicodedata.normalize("NFKD", heading_text(heading)).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    value = re.sub(r"[^\w\- ]", "", heading_text(heading).strip().lower())
    return value.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text()
    found = {slug(h) for h in headings(text)}
    found |= {m.group(1) for m in re.finditer(r"^::: (\S+)", text, re.M)}  # mkdocstrings' headings
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link and image outside code."""
    return [(n, m.group(1)) for n, line in prose_lines(path.read_text())
            for m in re.finditer(r"\]\(([^)\s]+)\)", line)]


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md")), *result_pages()]


def result_pages() -> list[Path]:
    return sorted(p for p in RESULTS.glob("*.md") if "_smoke." not in p.name)


def readme_commands() -> list[list[str]]:
    """Every command of the README's shell blocks, split at && and with continuation lines joined."""
    commands = []
    for lang, body, _ in fenced_blocks(README.read_text()):
        if lang not in ("bash", "sh", "shell"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1:]
    return commands


# --------------------------------------------------------------------------------------------------
# The README as a front page


def opening_block() -> list[str]:
    """The command lines of the README's first block, which must come right after its title."""
    text = README.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("# "), "README.md starts with its title"
    first = next(n for n, line in enumerate(lines[1:], 2) if line.strip())
    lang, body, start = fenced_blocks(text)[0]
    assert start == first, f"README.md must open with the set-up and test commands, not line {first}"
    return [line for line in body.splitlines() if line.strip()]


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"
    setup, test = opening_block()
    assert setup.startswith("pip install") and 'pip install -e ".[dev]"' in setup, setup
    assert setup.endswith("&& flashzo demo"), f"the set-up command also runs the main job: {setup}"
    assert test.split()[0] == "pytest", test


def test_ci_runs_the_readme_commands():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in opening_block():
        assert command in ci, f".ci/run does not run the README's command {command!r}"
    assert any(re.match(r"(\S+ )*mkdocs build --strict", line) for line in ci), ".ci/run builds the docs site"


def test_site_front_page_shows_the_readme_commands():
    blocks = fenced_blocks((DOCS / "index.md").read_text())
    assert any([line for line in body.splitlines() if line.strip()] == opening_block() for _, body, _ in blocks)


def test_readme_file_tree_names_existing_paths():
    """Every path the annotated tree names exists, and every top-level folder of the checkout is in it."""
    text = README.read_text()
    tree = next(body for lang, body, _ in fenced_blocks(text) if lang == "text")
    named, parents = set(), {0: ""}  # indent -> the folder its entries are in
    for line in tree.splitlines():
        indent = len(line) - len(line.lstrip())
        paths, _ = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        assert indent in parents, f"README.md's file tree: {line.strip()!r} is not under a folder"
        for name in paths.split(", "):
            path = parents[indent] + name
            assert (ROOT / path).exists(), f"README.md's file tree names {path}, which does not exist"
            named.add(path.rstrip("/"))
        parents = {i: p for i, p in parents.items() if i <= indent}
        if name.endswith("/"):
            parents[indent + 2] = parents[indent] + name
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: the tracked folders are unknown")
    folders = {p.split("/")[0] for p in tracked.stdout.splitlines() if "/" in p}
    missing = [f for f in sorted(folders) if not any(n == f or n.startswith(f + "/") for n in named)]
    assert not missing, f"README.md's file tree leaves out {missing}"


# --------------------------------------------------------------------------------------------------
# Links and the site's navigation


def test_every_relative_link_resolves():
    problems = []
    for path in markdown_files():
        for n, target in links(path):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(ROOT)}:{n}: {target}"
            if not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: {dest.name} has no heading #{anchor}")
    assert not problems, "\n".join(problems)


def test_anchors_are_the_same_in_the_site_and_on_github():
    """Headings whose MkDocs and GitHub anchors agree and are unique, so one link works in both."""
    problems = []
    for path in [README, *sorted(DOCS.rglob("*.md"))]:  # the pages people write (bench/ writes the results')
        seen = set()
        for heading in headings(path.read_text()):
            if slug(heading) != github_slug(heading):
                problems.append(f"{path.name}: '{heading}' is #{slug(heading)} in the site, "
                                f"#{github_slug(heading)} on GitHub")
            if slug(heading) in seen:
                problems.append(f"{path.name}: two headings are #{slug(heading)}")
            seen.add(slug(heading))
    assert not problems, "\n".join(problems)


def nav_entries(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [e for value in node.values() for e in nav_entries(value)]
    return [e for item in node for e in nav_entries(item)]


def test_nav_lists_every_page():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = nav_entries(config["nav"])
    pages = [p.relative_to(DOCS).as_posix() for p in sorted(DOCS.rglob("*.md"))]
    pages += [os.path.relpath(p, DOCS).replace(os.sep, "/") for p in result_pages()]
    assert sorted(set(nav)) == sorted(nav), "a page is listed twice in mkdocs.yml's nav"
    assert not set(pages) - set(nav), f"pages missing from mkdocs.yml's nav: {sorted(set(pages) - set(nav))}"
    assert not set(nav) - set(pages), f"mkdocs.yml's nav lists missing pages: {sorted(set(nav) - set(pages))}"


# --------------------------------------------------------------------------------------------------
# Every public name documented


def documented_names() -> dict[str, str]:
    """Every `::: name` of the API pages -> the page that renders it."""
    return {m.group(1): page.name for page in sorted(API.glob("*.md"))
            for m in re.finditer(r"^::: (\S+)\s*$", page.read_text(), re.M)}


def resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def has_docstring(name: str, obj) -> bool:
    if inspect.isclass(obj) or inspect.isroutine(obj):
        doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
        # a dataclass without a docstring gets its signature as one
        return bool(doc and doc.strip()) and not doc.startswith(f"{obj.__name__}(")
    return attribute_docstring(name, obj) is not None


def attribute_docstring(name: str, obj) -> str | None:
    """The string literal after the module-level assignment of `name` (how griffe documents values)."""
    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith("flashzo") or getattr(module, name, None) is not obj:
            continue
        try:
            tree = ast.parse(inspect.getsource(module))
        except (OSError, TypeError):
            continue
        body = tree.body
        for stmt, after in zip(body, body[1:]):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets) and isinstance(after, ast.Expr) \
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                return after.value.value
    return None


def test_every_public_name_is_in_the_api_reference():
    documented = documented_names()
    missing = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            here = f"{module_name}.{name}"
            # a name several modules export is documented once, under any of them
            if here not in documented and not any(
                    d.rsplit(".", 1)[-1] == name and resolve(d) is obj for d in documented):
                missing.append(here)
    assert not missing, f"public names missing from docs/api/*.md: {missing}"


def test_every_documented_name_exists_and_has_a_docstring():
    documented = documented_names()
    assert documented, "docs/api/*.md render no name"
    missing = []
    for name, page in documented.items():
        try:
            obj = resolve(name)
        except (ImportError, AttributeError):
            missing.append(f"{page}: {name} does not exist")
            continue
        if not has_docstring(name.rsplit(".", 1)[-1], obj):
            missing.append(f"{page}: {name} has no docstring")
    assert not missing, "\n".join(missing)


def test_docstring_check_refuses_a_name_without_one():
    """has_docstring tells a written docstring from none, and from a dataclass's generated one."""
    from dataclasses import dataclass

    @dataclass
    class Bare:
        x: int = 0

    def bare():
        pass

    import flashzo

    assert not has_docstring("Bare", Bare) and not has_docstring("bare", bare)
    assert has_docstring("MeZOTrainer", flashzo.MeZOTrainer) and has_docstring("__version__", flashzo.__version__)
    assert attribute_docstring("no_such_name", object()) is None


# --------------------------------------------------------------------------------------------------
# The README's code, as written


def test_readme_python_blocks_run(tmp_path):
    blocks = [body for lang, body, _ in fenced_blocks(README.read_text()) if lang == "python"]
    assert blocks, "README.md has a Python example"
    for i, body in enumerate(blocks):
        script = tmp_path / f"readme_{i}.py"
        script.write_text(body)
        run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, f"README.md's Python block {i} failed:\n{run.stdout}\n{run.stderr}"


def test_readme_commands_are_ones_the_test_knows():
    unknown = sorted({words[0] for words in readme_commands()} - SHELL_COMMANDS)
    assert not unknown, f"README.md runs {unknown}: teach tests/test_docs.py to check them"


def test_readme_flashzo_commands_parse():
    """Every `flashzo ...` command of the README is accepted by the command's own parser."""
    from flashzo.cli import build_parser

    commands = [words for words in readme_commands() if words[0] == "flashzo"]
    assert {words[1] for words in commands} >= {"demo", "train", "eval", "merge", "serve"}
    for words in commands:
        if "--help" in words:  # run by test_readme_cheap_commands_run: it may name subcommands only
            assert not [w for w in words[1:] if w.startswith("-") and w != "--help"], shlex.join(words)
            continue
        try:
            build_parser().parse_args(words[1:])
        except SystemExit as stop:
            pytest.fail(f"README.md's `{shlex.join(words)}` does not parse (exit {stop.code})")


def test_readme_cheap_commands_run(tmp_path):
    """The README's --help commands and `python -c` lines run as written (in a temporary directory)."""
    ran = 0
    for words in readme_commands():
        if words[0] == "flashzo" and "--help" in words:
            argv = [sys.executable, "-m", "flashzo", *words[1:]]
        elif words[:2] == ["python", "-c"]:
            argv = [sys.executable, *words[1:]]
        else:
            continue
        run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"README.md's `{shlex.join(words)}` failed:\n{run.stdout}\n{run.stderr}"
        ran += 1
    assert ran >= 2


def test_readme_command_reader_sees_every_command():
    """readme_commands splits at && and joins continuation lines, as a shell does."""
    commands = readme_commands()
    assert ["flashzo", "demo"] in commands and ["pytest"] in commands
    assert all("&&" not in words and "\\" not in words for words in commands)


# --------------------------------------------------------------------------------------------------
# The site


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs and mkdocstrings are not installed (the dev extra installs them)")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                          str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    assert (tmp_path / "site" / "api" / "flashzo.html").exists()
    assert (tmp_path / "site" / "bench" / "results" / "step_cpu.png").exists()
