"""Build the plugin manager and the typed view of the backends it offers."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from typing import Any, cast

import msgspec
import pluggy

from core import hookspecs
from core.errors import InvalidRequest
from core.hookspecs import Backend
from core.models import Job

log = logging.getLogger(__name__)


BUILTIN_PLUGINS = ("plugins.databricks", "plugins.http_webhook")
"""The plugins shipped with Tether, registered before entry points. Named by
module path and imported only here, so `core` itself never depends on a plugin."""


def make_plugin_manager(
    *, builtins: bool = True, entry_points: bool = True, extra: Iterable[Any] = ()
) -> pluggy.PluginManager:
    """A plugin manager with Tether's hook specs, the built-in plugins, the
    `tether` entry-point group and `extra` plugins registered, checked so that a
    hookimpl matching no spec fails here, loudly."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs.TetherHookSpecs)
    for name in BUILTIN_PLUGINS if builtins else ():
        pm.register(importlib.import_module(name), name=name)
    if entry_points:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    for plugin in extra:
        pm.register(plugin)
    pm.check_pending()
    return pm


class Plugins:
    """Typed facade over `pm.hook`: the rest of Tether never spells a hook name."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.backends: dict[str, Backend] = {}
        owners: dict[str, str] = {}
        for impl in pm.hook.tether_backends.get_hookimpls():
            offered = cast("Iterable[Any]", impl.function() or ())
            for backend in offered:
                if not isinstance(backend, Backend):
                    raise TypeError(
                        f"plugin {impl.plugin_name!r} offered {backend!r},"
                        " not a core.plugin.Backend"
                    )
                if backend.name in owners:
                    raise ValueError(
                        f"backend {backend.name!r} is offered by two plugins: "
                        f"{owners[backend.name]!r} and {impl.plugin_name!r}"
                    )
                owners[backend.name] = impl.plugin_name
                self.backends[backend.name] = backend

    def backend(self, name: str) -> Backend:
        """The backend called `name`; `InvalidRequest` listing the valid names if none."""
        try:
            return self.backends[name]
        except KeyError:
            valid = ", ".join(sorted(self.backends)) or "(none installed)"
            raise InvalidRequest(
                f"unknown backend {name!r}; valid backends: {valid}",
                {"field": "backend", "valid": sorted(self.backends)},
            ) from None

    def convert_params(self, backend: Backend, params: dict[str, Any]) -> Any:
        """`params` converted to the backend's `params_type`, or `InvalidRequest`
        naming the field that does not fit."""
        try:
            return msgspec.convert(params, backend.params_type)
        except msgspec.ValidationError as exc:
            reason = str(exc).replace("`$.", "`params.").replace("`$`", "`params`")
            if " - at `" not in reason:
                reason += " - at `params`"
            raise InvalidRequest(
                f"invalid params for backend {backend.name!r}: {reason}",
                {"field": "params", "backend": backend.name},
            ) from None

    def job_finished(self, job: Job) -> None:
        """Tell every plugin; one that raises is logged and does not stop the others."""
        for impl in self.pm.hook.tether_job_finished.get_hookimpls():
            try:
                impl.function(**{name: job for name in impl.argnames})
            except Exception:
                log.exception(
                    "plugin %r failed in tether_job_finished for job %s", impl.plugin_name, job.id
                )
