"""`tether install`, `tether plugins`, `tether uninstall`, for real, in the
environment the tests run from; and `./dev`'s set-up step keeps a plugin
installed that way (only `./dev test` syncs its own environment exactly)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TETHER = shutil.which("tether", path=str(Path(sys.executable).parent)) or "tether"


def tether(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TETHER, *args], capture_output=True, text=True, timeout=120, check=False)


def echo_installed() -> bool:
    probe = [sys.executable, "-c", "import importlib.metadata as m; m.version('tether-echo')"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def test_a_plugin_installed_with_tether_install_is_listed_kept_and_removed() -> None:
    assert not echo_installed()
    installed = tether("install", str(ROOT / "examples" / "tether_echo"))
    try:
        assert installed.returncode == 0, installed.stderr
        listing = tether("plugins").stdout.splitlines()
        assert listing[0].split() == ["PLUGIN", "PACKAGE", "BACKENDS"]
        assert ["echo", "tether-echo", "0.1.0", "echo"] in [row.split() for row in listing]
        assert ["plugins.databricks", "tether", version("tether"), "databricks"] in [
            row.split() for row in listing
        ]

        # `./dev serve` first brings the environment up to the lock file: that
        # step must leave a plugin the user installed where it is.
        env = {**os.environ, "UV_PROJECT_ENVIRONMENT": sys.prefix}
        dev = subprocess.run(
            [str(ROOT / "dev"), "no-such-command"], env=env, capture_output=True, timeout=300
        )
        assert dev.returncode == 2  # the usage line, after the set-up step
        assert echo_installed()
    finally:
        removed = tether("uninstall", "tether-echo")
    assert removed.returncode == 0, removed.stderr
    assert not echo_installed()
    assert "echo" not in tether("plugins").stdout.split()


def test_tether_refuses_to_uninstall_itself() -> None:
    refused = tether("uninstall", "Tether")
    assert refused.returncode == 2
    assert "cannot uninstall itself" in refused.stderr
