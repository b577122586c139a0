"""What every benchmark shares: the commit and CPU it records, and how it writes its report."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    """Short hash of HEAD, with "-dirty" when tracked files differ from it; "unknown" outside git."""
    try:
        sha = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_report(stem: str, report: dict, markdown: Callable[[dict], str], plot: Callable[[dict, str], None]
                 ) -> list[str]:
    """Write `stem`.json, .md (markdown(report)) and .png (plot(report, path)); print the table."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    md = markdown(report)
    with open(stem + ".md", "w") as f:
        f.write(md)
    plot(report, stem + ".png")
    print(md)
    print(f"wrote {stem}.json, {stem}.md, {stem}.png")
    return [stem + ext for ext in (".json", ".md", ".png")]
