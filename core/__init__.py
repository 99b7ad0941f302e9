"""Tether's core: the use cases, the workflow, the stores and the plugin contract."""

import functools
import importlib.metadata


@functools.cache
def version() -> str:
    """This release (`pyproject.toml`; CHANGELOG.md), or `unknown` where the
    package is not installed: `tether --version`, `/health`, the API's
    document and the start-up line all say it."""
    try:
        return importlib.metadata.version("tether")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
