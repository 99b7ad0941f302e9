"""`tether install`, `tether uninstall`, `tether plugins`: plugin packages in the
environment Tether runs from (like `llm install` and `datasette install`).

Packages go into this interpreter's environment (`sys.executable`) through
uv's pip interface when uv is there (`./dev` installs it), else through pip.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

from core.plugins import Plugins

PROTECTED = frozenset({"tether"})
"""Packages `tether uninstall` refuses: Tether cannot remove itself."""


def installer(verb: str) -> list[str] | None:
    """The command that runs `verb` (install, uninstall) on this environment."""
    uv = os.environ.get("UV") or shutil.which("uv")
    if uv:
        return [uv, "pip", verb, "--python", sys.executable]
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip", verb, *(["--yes"] if verb == "uninstall" else [])]
    return None


def run(verb: str, packages: list[str]) -> int:
    """`tether install|uninstall PACKAGE...`: the installer's own exit code."""
    if verb == "uninstall" and PROTECTED & {p.lower() for p in packages}:
        print("tether: tether cannot uninstall itself", file=sys.stderr)
        return 2
    command = installer(verb)
    if command is None:
        print(
            "tether: neither uv nor pip is available to this environment; install uv"
            " (`python3 -m pip install uv`) and try again",
            file=sys.stderr,
        )
        return 2
    return subprocess.run([*command, *packages], check=False).returncode


def table(plugins: Plugins) -> str:
    """`tether plugins`: each plugin, its distribution and version, its backends."""
    rows = [("PLUGIN", "PACKAGE", "BACKENDS")]
    for name, (package, backends) in sorted(plugins.by_plugin().items()):
        rows.append((name, package, ", ".join(backends) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(
        f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}".rstrip() for row in rows
    )
