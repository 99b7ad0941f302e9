"""Build the plugin manager and the typed view of the backends it offers."""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
import pluggy

from core import hookspecs
from core.errors import InvalidRequest
from core.hookspecs import Backend
from core.models import Job
from core.settings import OTHER_KNOWN, PREFIX, Settings, env_names

log = logging.getLogger(__name__)


BUILTIN_PLUGINS = ("plugins.databricks", "plugins.databricks_sql", "plugins.http_webhook")
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
        _load_entry_points(pm)
    try:
        for plugin in extra:
            pm.register(plugin)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(_invalid(pm, exc)) from None
    return pm


HOOK_NAMES = [name for name in vars(hookspecs.TetherHookSpecs) if name.startswith("tether_")]


class PluginError(ValueError):
    """An installed plugin that cannot be used: one that fails to import, or
    implements a hook Tether has no spec for (a misspelt name). Said in one
    line naming the plugin, its package and how to remove it."""


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register each plugin of the `tether` entry-point group, through
    pluggy's own loader one entry point at a time, so that one that fails
    (a missing dependency, an error at import) is named with its package."""
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points.select(group=hookspecs.PROJECT):
            try:
                pm.load_setuptools_entrypoints(hookspecs.PROJECT, name=ep.name)
                pm.check_pending()  # this plugin's hooks: each matches a spec
            except pluggy.PluginValidationError as exc:
                raise PluginError(_invalid(pm, exc, dist, ep.name)) from None
            except Exception as exc:
                raise PluginError(
                    f"plugin {ep.name!r}{_of(dist)} cannot be loaded:"
                    f" {_one_line(f'{type(exc).__name__}: {exc}')}{_remedy(dist)}"
                ) from None


def _invalid(
    pm: pluggy.PluginManager,
    exc: pluggy.PluginValidationError,
    dist: importlib.metadata.Distribution | None = None,
    entry_point: str | None = None,
) -> str:
    """pluggy's refusal of a plugin, with the plugin named as Tether names it
    and, for a hook Tether has no spec for, the nearest hook it has."""
    name = pm.get_name(exc.plugin) or entry_point or repr(exc.plugin)  # refused at register
    said = _one_line(str(exc).replace(f" in plugin {exc.plugin!r}", ""))
    unknown = said.removeprefix("unknown hook ").strip("'")
    if unknown != said:
        near = difflib.get_close_matches(unknown, HOOK_NAMES, n=1)
        said += f" (did you mean {near[0]}?)" if near else " (no such hook: docs/plugins.md)"
    return f"plugin {name!r}{_of(dist)} cannot be used: {said}{_remedy(dist)}"


def _one_line(text: str) -> str:
    """`text` on one line (pluggy's refusal of a hook's arguments spans three),
    at most 300 characters: an import's error may quote a whole file's line."""
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:299] + "…"


def _of(dist: importlib.metadata.Distribution | None) -> str:
    return f" of package {dist.metadata['Name']} {dist.version}" if dist is not None else ""


def _remedy(dist: importlib.metadata.Distribution | None) -> str:
    if dist is None:  # registered in code, not installed
        return ""
    return f"; fix it, or remove it with `tether uninstall {dist.metadata['Name']}`"


class Plugins:
    """Typed facade over `pm.hook`: the rest of Tether never spells a hook name.
    Hooks are called through pluggy's hook callers, so its tracing, ordering
    and wrappers apply."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.backends: dict[str, Backend] = {}
        offered = [b for result in pm.hook.tether_backends() for b in result or ()]
        for backend in offered:
            if not isinstance(backend, Backend):
                raise TypeError(f"a plugin offered {backend!r}, not a core.plugin.Backend")
            if backend.name in self.backends:
                owners = self._owners(backend.name)
                raise ValueError(
                    f"backend {backend.name!r} is offered by two plugins: "
                    + " and ".join(repr(o) for o in owners)
                )
            self.backends[backend.name] = backend
        # `tether_job_finished` is called one plugin at a time: pluggy stops a
        # hook call at the first exception, and one plugin's failure must not
        # keep the others from hearing that a job finished.
        self._job_finished = [
            (impl.plugin_name, pm.subset_hook_caller("tether_job_finished", self._others(impl)))
            for impl in pm.hook.tether_job_finished.get_hookimpls()
        ]

    def _others(self, impl: pluggy.HookImpl) -> list[object]:
        return [p for p in self.pm.get_plugins() if p is not impl.plugin]

    def _offered_by(self) -> dict[str, list[Any]]:
        """What each plugin's `tether_backends` offers, each asked on its own
        (only to name plugins in an error or a listing)."""
        offered = {}
        for impl in self.pm.hook.tether_backends.get_hookimpls():
            alone = self.pm.subset_hook_caller("tether_backends", self._others(impl))
            offered[impl.plugin_name] = [b for got in alone() for b in got or ()]
        return offered

    def _owners(self, name: str) -> list[str]:
        """The plugins offering a backend called `name`."""
        return [
            plugin
            for plugin, backends in self._offered_by().items()
            if any(getattr(b, "name", None) == name for b in backends)
        ]

    def setting_names(self) -> set[str]:
        """Every `TETHER_*` variable something expects: core's settings, those
        each backend declares (`settings_type`, `settings_prefix`), the command
        line's and the test suite's."""
        names = env_names(Settings, PREFIX) | OTHER_KNOWN
        for backend in self.backends.values():
            if backend.settings_type is not None:
                names |= env_names(backend.settings_type, backend.settings_prefix)
        return names

    def versions(self) -> dict[str, str]:
        """Each backend's plugin distribution and version, e.g. `"tether-echo
        0.1.0"`: the distribution that installed the plugin's module, or Tether's
        own for the built-in plugins."""
        # Which distribution installed a module is a scan of every installed
        # distribution's files (~0.2 s, on each `tether serve`'s start): made only
        # when a backend is not built in.
        by_module: Mapping[str, list[str]] = {}
        shown = {}
        for name, backend in self.backends.items():
            top = type(backend).__module__.split(".")[0]
            if top != "plugins" and not by_module:
                by_module = importlib.metadata.packages_distributions()
            dists = ["tether"] if top == "plugins" else by_module.get(top, [])
            shown[name] = next((f"{d} {_version(d)}" for d in dists), "unknown version")
        return shown

    def by_plugin(self) -> dict[str, tuple[str, list[str]]]:
        """Each plugin that offers backends: its distribution with version (as
        `versions` shows it) and its backends' names."""
        shown = self.versions()
        found: dict[str, tuple[str, list[str]]] = {}
        for plugin, backends in self._offered_by().items():
            names = sorted(b.name for b in backends)
            found[plugin] = (shown[names[0]] if names else "unknown version", names)
        return found

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
        """A new job's `params` converted to the backend's `params_type` and
        checked by its `check_new_params`, or `InvalidRequest` naming the
        field that does not fit."""
        try:
            converted = msgspec.convert(params, backend.params_type)
            backend.check_new_params(converted)
        except (msgspec.ValidationError, ValueError) as exc:
            reason = str(exc).replace("`$.", "`params.").replace("`$`", "`params`")
            if " - at `" not in reason:
                reason += " - at `params`"
            field = reason.rpartition(" - at `")[2].removesuffix("`")  # e.g. params.timeout
            raise InvalidRequest(
                f"invalid params for backend {backend.name!r}: {reason}",
                {"field": field, "backend": backend.name},
            ) from None
        return converted

    @property
    def told_of_finish(self) -> bool:
        """Whether any plugin implements `tether_job_finished`."""
        return bool(self._job_finished)

    def job_finished(self, job: Job) -> None:
        """Tell every plugin; one that raises is logged and does not stop the others."""
        for plugin_name, call in self._job_finished:
            try:
                call(job=job)
            except Exception:
                log.exception(
                    "plugin %r failed in tether_job_finished for job %s", plugin_name, job.id
                )


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"
