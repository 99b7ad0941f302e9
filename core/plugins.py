"""Build the plugin manager and the typed view of the backends it offers."""

from __future__ import annotations

import asyncio
import difflib
import importlib
import importlib.metadata
import inspect
import logging
import math
import numbers
import re
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec
import msgspec.inspect
import msgspec.structs
import pluggy

from core import hookspecs
from core.errors import InvalidRequest, shown
from core.hookspecs import Backend
from core.models import Job
from core.redact import declare_secret_settings, log_traceback, without_secrets
from core.settings import OTHER_KNOWN, PREFIX, Settings, env_names, secret_env_names

if TYPE_CHECKING:
    from core.store.jobs import JobRecord

log = logging.getLogger(__name__)
job_log = logging.getLogger("tether")
"""Where a line about one job goes: with that job's other lines."""


PLUGIN_EXITS = (SystemExit, KeyboardInterrupt)
"""What a plugin may raise that is no `Exception` and that, left to its task,
stops the event loop and so the service (a plugin's `sys.exit`; after a
restart, the replay of its trigger stopped it again: found by a QA pass).
Every call into a plugin's code while the service runs catches these
beside `Exception`, as the plugin bugs they are."""


PLUGIN_FAULTS = (Exception, asyncio.CancelledError, *PLUGIN_EXITS)
"""What a call into a plugin's code may raise, each a bug of the plugin's.
A `CancelledError` from synchronous code is its own (a task's cancellation
arrives at an `await`, never inside such a call; left to the task, it
cancelled the request or step that made the call); from an awaited call it
is the plugin's unless the task is being cancelled (`cancelling()`)."""


def cancelling() -> bool:
    """Whether the running task is being cancelled: a `CancelledError` is
    then its own, not one a plugin raised of its own (a failure like any
    other)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def stored_params(backend: Backend, raw: Any) -> Any:
    """A stored job's `raw` params converted with `backend.params_type`;
    `msgspec.ValidationError` when they no longer fit, or when the type's
    own checks (`__post_init__`) raise anything else, a `SystemExit` too,
    named by its type alone: params the plugin cannot take, whatever the
    reason. (A `SystemExit` left the step's or the look's task and stopped
    the service, again at each restart; another exception had the trigger
    step run again and again; found by a review.)"""
    try:
        return msgspec.convert(raw, backend.params_type)
    except msgspec.ValidationError:
        raise
    except PLUGIN_FAULTS as exc:
        raise msgspec.ValidationError(
            f"backend {backend.name!r}: its params_type raised {type(exc).__name__}"
        ) from None


BUGGY_CHECK_INTERVAL = 3600.0
"""Seconds until a job is looked at again after its plugin's `check_interval`
raised or answered what is no number of seconds: a plugin fixed and
redeployed meanwhile is asked again."""

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


SLOW_HOOK = 0.1
"""Seconds a `tether_job_finished` call may take before it is warned of: it
runs on the event loop, so a blocking one (an HTTP request, a file on a
network disk) stalls every job, callback and page of its process."""

HOOK_NAMES = [name for name in vars(hookspecs.TetherHookSpecs) if name.startswith("tether_")]


class PluginError(ValueError):
    """An installed plugin that cannot be used: one that fails to import,
    implements a hook Tether has no spec for (a misspelt name), or whose
    `tether_backends` raises or offers what is not a usable backend (no
    `name` or `params_type`, a name `BACKEND_NAME` refuses, one another
    backend has). Said in one line naming the plugin, its package and how to
    remove it."""


class PluginFault(RuntimeError):
    """A backend method that broke its contract at run time (raised what it
    may not, returned a wrong type): a bug in its plugin. Its message names
    the backend, the method and the exception's or answer's type, never the
    plugin's own words (they may quote a secret); the caller has logged it."""


BACKEND_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
"""A backend's name (fullmatch): 1 to 64 of `a-z 0-9 _ -`, beginning with a
letter. It is a path segment (`/backends/{name}/notifications`), a key of
`TETHER_MAX_RUNNING` (`name=N,...`), a word on the command line and a metric
label, unescaped in each; no two names differ by case alone."""
BACKEND_NAME_RULE = "1 to 64 of `a-z 0-9 _ -`, beginning with a letter"


def contract_answer(answer: Any, *types: type[msgspec.Struct]) -> tuple[Any, str | None]:
    """`answer`, what a backend method returned, as Tether reads it, and
    None; or None and why it breaks the method's contract, in words naming
    only types (never a value: it may quote a secret). It may be None or one
    of `types` whose typed fields fit their types (an `Outcome`'s `status`
    one of its four, its `error` an `ErrorInfo`: one given as a dict is read
    as one), and whose other fields (a result, progress) JSON can write."""
    if answer is None:
        return None, None
    expected = " or ".join(t.__name__ for t in types)
    if not isinstance(answer, types):
        return None, f"returned {_kind(answer)}, not {expected} or None"
    name = type(answer).__name__
    anything = {f.name for f in msgspec.structs.fields(answer) if f.type is Any}
    typed = msgspec.structs.replace(answer, **dict.fromkeys(anything))
    try:
        read = msgspec.convert(msgspec.to_builtins(typed), type(answer))
    except (msgspec.ValidationError, TypeError, ValueError):
        return None, f"returned a malformed {name} (a field of another type)"
    # What may be any JSON (a result, progress) is bounded and masked where
    # it is kept, whatever it is, but it must be JSON: a value JSON cannot
    # write (an `object()`) failed where it was kept, a callback's 500 and a
    # status check's `TypeError` at every interval (found by a QA pass).
    for field in sorted(anything):
        try:
            msgspec.json.encode(getattr(answer, field))
        except RecursionError:  # nested too deep: kept as a marker (`core.bounds.shallow`)
            pass
        except (TypeError, ValueError, OverflowError) as exc:
            said = f"its {field} is not JSON: {type(exc).__name__}"
            return None, f"returned a malformed {name} ({said})"
    return msgspec.structs.replace(read, **{n: getattr(answer, n) for n in anything}), None


def _kind(value: Any) -> str:
    """What `value` is, by its type alone: `a dict`, `the class Echo`."""
    if isinstance(value, type):
        return f"the class {value.__qualname__}"
    if value is None:
        return "None"
    return f"a {type(value).__name__}"


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
        self._dists = {pm.get_name(p): d for p, d in pm.list_plugin_distributions()}
        self._offered: dict[str, list[Backend]] = {}
        owner: dict[str, str] = {}
        for hook in HOOK_NAMES:
            for impl in getattr(pm.hook, hook).get_hookimpls():
                if inspect.iscoroutinefunction(impl.function):
                    said = (
                        f"its {hook} is an async def; Tether calls it without awaiting it,"
                        " so its body would never run: make it a plain def"
                    )
                    raise self._refused(impl.plugin_name, said)
        # Each plugin asked on its own (in the order one hook call asks
        # them), so that what one of them does wrong is said naming it.
        for impl in reversed(pm.hook.tether_backends.get_hookimpls()):
            plugin = impl.plugin_name
            self._offered[plugin] = self._backends_of(impl)
            for backend in self._offered[plugin]:
                if backend.name in self.backends:
                    raise self._clash(backend.name, plugin, owner[backend.name])
                self.backends[backend.name] = backend
                owner[backend.name] = plugin
                if backend.settings_type is not None:
                    declare_secret_settings(
                        secret_env_names(backend.settings_type, backend.settings_prefix)
                    )
        # `tether_job_finished` is called one plugin at a time: pluggy stops a
        # hook call at the first exception, and one plugin's failure must not
        # keep the others from hearing that a job finished.
        self._job_finished = [
            (impl.plugin_name, pm.subset_hook_caller("tether_job_finished", self._others(impl)))
            for impl in pm.hook.tether_job_finished.get_hookimpls()
        ]

    def _others(self, impl: pluggy.HookImpl) -> list[object]:
        return [p for p in self.pm.get_plugins() if p is not impl.plugin]

    def _refused(self, plugin: str, said: str) -> PluginError:
        """Plugin `plugin` refused at start-up, in one line naming its package
        and how to remove it (as an import's failure is)."""
        dist = self._dists.get(plugin)
        return PluginError(f"plugin {plugin!r}{_of(dist)} cannot be used: {said}{_remedy(dist)}")

    def _backends_of(self, impl: pluggy.HookImpl) -> list[Backend]:
        """What one plugin's `tether_backends` offers, each checked: a
        `Backend` instance with a `name` `BACKEND_NAME` takes and a
        `params_type` msgspec can convert to. `PluginError` naming the
        plugin for anything else, or for the hook raising. A `ValueError`
        of a plugin that is not an installed package's (a built-in's
        setting refused, naming its variable) is said as it is, as a core
        setting's refusal is."""
        plugin = impl.plugin_name
        alone = self.pm.subset_hook_caller("tether_backends", self._others(impl))
        try:
            answers = alone()
        except ValueError as exc:
            if plugin not in self._dists:
                raise
            raise self._refused(plugin, _one_line(without_secrets(str(exc)))) from None
        except Exception as exc:  # (its words masked: a QA pass saw an API token in them)
            words = without_secrets(str(exc))
            said = _one_line(f"tether_backends raised {type(exc).__name__}: {words}")
            raise self._refused(plugin, said) from None
        offered: list[Backend] = []
        for answer in answers:  # none when it returned None: it offers nothing
            if isinstance(answer, str | bytes | Mapping) or not isinstance(answer, Iterable):
                raise self._refused(
                    plugin,
                    f"tether_backends returned {_kind(answer)}, not a list of"
                    " core.plugin.Backend instances",
                )
            for backend in answer:
                fault = _backend_fault(backend)
                if fault:
                    raise self._refused(plugin, fault)
                offered.append(backend)
        return offered

    def _clash(self, name: str, plugin: str, other: str) -> PluginError:
        """Two backends called `name`: offered by `plugin` (registered
        first) and `other`, or twice by one plugin."""
        if plugin == other:
            return self._refused(plugin, f"it offers two backends named {name!r}")
        named = " and ".join(
            f"{p!r}{' (built into tether)' if p in BUILTIN_PLUGINS else _of(self._dists.get(p))}"
            for p in (plugin, other)
        )
        packages = [self._dists[p].metadata["Name"] for p in (plugin, other) if p in self._dists]
        remedy = " or ".join(f"`tether uninstall {p}`" for p in packages)
        return PluginError(
            f"backend {name!r} is offered by two plugins: {named}"
            + (f"; remove one with {remedy}" if remedy else "")
        )

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
        0.1.0"`: the distribution whose entry point registered the plugin, or
        that installed the plugin's module, or Tether's own for the built-in
        plugins."""
        # Which distribution installed a module is a scan of every installed
        # distribution's files (~0.2 s, on each `tether serve`'s start): made only
        # for a backend neither built in nor of an entry point's plugin.
        by_module: Mapping[str, list[str]] = {}
        of_plugin = {
            b.name: self._package(p) for p, backends in self._offered.items() for b in backends
        }
        shown = {}
        for name, backend in self.backends.items():
            if of_plugin.get(name):
                shown[name] = of_plugin[name]
                continue
            top = type(backend).__module__.split(".")[0]
            if top != "plugins" and not by_module:
                by_module = importlib.metadata.packages_distributions()
            dists = ["tether"] if top == "plugins" else by_module.get(top, [])
            shown[name] = next((f"{d} {_version(d)}" for d in dists), "unknown version")
        return shown

    def _package(self, plugin: str) -> str:
        """`plugin`'s distribution and version if an entry point registered
        it, else ""."""
        dist = self._dists.get(plugin)
        return "" if dist is None else f"{dist.metadata['Name']} {dist.version}"

    def by_plugin(self) -> dict[str, tuple[str, list[str]]]:
        """Each plugin that implements `tether_backends`: its distribution
        with version (as `versions` shows it; an entry point's plugin that
        offers none its own) and its backends' names."""
        shown = self.versions()
        found: dict[str, tuple[str, list[str]]] = {}
        for plugin, backends in self._offered.items():
            names = sorted(b.name for b in backends)
            package = shown[names[0]] if names else self._package(plugin) or "unknown version"
            found[plugin] = (package, names)
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
        field that does not fit. Anything else either raises is a bug in
        the plugin: logged in one line naming the backend and the
        exception's type (not its words), and `PluginFault`."""
        try:
            converted = msgspec.convert(params, backend.params_type)
        except msgspec.ValidationError as exc:
            raise _refusal(backend, exc) from None
        except PLUGIN_FAULTS as exc:  # __post_init__ may raise anything
            raise _fault(backend, "converting params to its params_type raised", exc) from None
        try:
            backend.check_new_params(converted)
        except ValueError as exc:
            raise _refusal(backend, exc) from None
        except PLUGIN_FAULTS as exc:
            raise _fault(backend, "check_new_params raised", exc) from None
        return converted

    def check_interval(
        self, backend: Backend, rec: JobRecord, params: Any, longest: float
    ) -> tuple[float | None, bool]:
        """`backend.check_interval(params)` for job `rec` (its `params`
        converted), asked right after the trigger answered and again at each
        routine status check: seconds, at most `longest` (`max_timeout`: the
        job ends first, and a larger one would not fit the store's
        timestamp), or None (no status checks, the default's answer); and
        whether that was a bug's. One that raises (a `SystemExit` too), or
        answers what is no number of seconds (a string, a bool, a negative
        number, NaN), is a bug in its plugin: a warning names the backend,
        and the job is looked at again `BUGGY_CHECK_INTERVAL` on, whatever
        its age, when a plugin fixed meanwhile plans again (raised, the
        trigger would be run again and ask for a run it started already;
        None stopped the job's checks for good, found by a review)."""
        after = f"the job is looked at again in {BUGGY_CHECK_INTERVAL:g} s"
        try:
            seconds = backend.check_interval(params)
        except PLUGIN_FAULTS as exc:  # its type alone, as for the other hooks' bugs
            job_log.warning(
                "job %s: backend %r: check_interval raised %s; %s",
                rec.id,
                rec.backend,
                type(exc).__name__,
                after,
                extra=rec.log_extra(),
            )
            return BUGGY_CHECK_INTERVAL, True
        if seconds is None:
            return None, False
        if (
            isinstance(seconds, numbers.Real)
            and not isinstance(seconds, bool)
            and math.isfinite(seconds)
            and seconds >= 0
        ):
            return min(float(seconds), longest) or None, False
        job_log.warning(
            "job %s: backend %r: check_interval returned %s, not a number of seconds (or None); %s",
            rec.id,
            rec.backend,
            repr(seconds) if isinstance(seconds, numbers.Real) else _kind(seconds),
            after,
            extra=rec.log_extra(),
        )
        return BUGGY_CHECK_INTERVAL, True

    def not_stopped(self, backend: str, external: Any) -> str:
        """What an ended job's error adds when its run (`external`: one was
        recorded) cannot be stopped: its backend is not installed here. A
        cancel said so; a timeout said nothing, and the run went on unseen
        (a QA pass, 2026-12-07)."""
        if external is None or backend in self.backends:
            return ""
        return f"; the external run could not be stopped: backend {backend!r} is not installed"

    @property
    def told_of_finish(self) -> bool:
        """Whether any plugin implements `tether_job_finished`."""
        return bool(self._job_finished)

    def job_finished(self, job: Job) -> None:
        """Tell every plugin; one that raises is logged and does not stop the
        others. One that took `SLOW_HOOK` seconds or more is warned of: it
        held every job of this process meanwhile (the hook must not block)."""
        for plugin_name, call in self._job_finished:
            began = time.monotonic()
            try:
                call(job=job)
            except PLUGIN_FAULTS as exc:
                log_traceback(
                    log,
                    logging.ERROR,
                    exc,
                    (),
                    "plugin %r failed in tether_job_finished for job %s",
                    plugin_name,
                    job.id,
                )
            took = time.monotonic() - began
            if took >= SLOW_HOOK:
                log.warning(
                    "plugin %r took %.0f ms in tether_job_finished for job %s, holding every"
                    " job of this process meanwhile: the hook must not block (hand slow work"
                    " to a queue or a thread)",
                    plugin_name,
                    took * 1000,
                    job.id,
                )


NUMBER_UNION = re.compile(r"Expected `int \| float( \| null)?`")
"""msgspec's words for an `int | float` field (`_refusal`)."""
AT = re.compile(r" - at (?:a key in )?`(?P<path>[^`]*)`$")
"""Where a refusal's message says the error is, after the words: `params.a.b`,
or a key in `params.a` for a key of that dict (the field is then the dict)."""


def _refusal(backend: Backend, exc: Exception) -> InvalidRequest:
    """A new job's params refused (by `params_type` or `check_new_params`):
    422 naming the field at fault. msgspec names the struct whose
    `__post_init__` refused (`params` for a `check_new_params` refusal,
    which names none): a message that begins with one of that struct's
    fields (`` `row_limit` must ``, `url must`, `tasks[0] needs`) names
    that field."""
    reason = str(exc).replace("`$.", "`params.").replace("`$`", "`params`")
    reason = reason.replace(" - at `key` in `", " - at a key in `")  # msgspec's words
    # An `int | float` field takes any number (or, as a plugin's ids do, a
    # whole one written `7.0`): msgspec's "Expected `int | float | null`, got
    # `str`" named a float for an id, where a number was meant.
    reason = NUMBER_UNION.sub(lambda m: "Expected a number" + (" or null" if m[1] else ""), reason)
    at = AT.search(reason)
    field = at["path"] if at else "params"  # e.g. params.timeout
    # The plugin's own words (a `ValueError` of `__post_init__`, which msgspec
    # chains, or of `check_new_params`), not msgspec's ("Object contains ...").
    its_own = not isinstance(exc, msgspec.ValidationError) or exc.__cause__ is not None
    if its_own and (at is None or not at[0].startswith(" - at a key")):
        head = reason[: at.start()] if at else reason
        field = _named_field(backend.params_type, field, head) or field
        reason = f"{head} - at `{field}`"
    elif at is None:
        reason += " - at `params`"
    return InvalidRequest(
        f"invalid params for backend {backend.name!r}: {reason}",
        {"field": field, "backend": backend.name},
    )


LEADING_FIELD = re.compile(
    r"`?([A-Za-z_][A-Za-z0-9_]*)((?:\[[0-9]+\]|\.[A-Za-z_][A-Za-z0-9_]*)*)`?[ :]"
)
"""A refusal's message that begins with a field's name, and maybe a path
within it: `` `row_limit` must ``, `auth: unknown`, `tasks[0].notebook_task
must`."""
PATH_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[([0-9]+)\]")


def _named_field(params_type: Any, path: str, head: str) -> str | None:
    """`path` and the field of the struct there that `head` (a refusal's
    message) begins with, e.g. `params.submit.tasks[0]`; None if it begins
    with no field of it (`give exactly one of ...`)."""
    named = LEADING_FIELD.match(head)
    if named is None:
        return None
    try:
        info = msgspec.inspect.type_info(params_type)
        for step in PATH_STEP.finditer(path.removeprefix("params")):
            info = _step(_struct_or_list(info), step[1], step[2])
        struct = _struct_or_list(info)
    except (LookupError, TypeError, ValueError):
        return None
    if not isinstance(struct, msgspec.inspect.StructType):
        return None
    if named[1] not in {f.encode_name for f in struct.fields}:
        return None
    return f"{path}.{named[1]}{named[2]}"


def _struct_or_list(info: msgspec.inspect.Type) -> msgspec.inspect.Type:
    """`info` without its constraints, and of a union the one struct or list
    in it (`SubmitRun | None`)."""
    while isinstance(info, msgspec.inspect.Metadata):
        info = info.type
    if isinstance(info, msgspec.inspect.UnionType):
        kinds = (msgspec.inspect.StructType, msgspec.inspect.ListType)
        [info] = [t for t in info.types if isinstance(t, kinds)]  # ValueError unless one
    return info


def _step(info: msgspec.inspect.Type, name: str | None, index: str | None) -> msgspec.inspect.Type:
    """The type one step of a path leads to: a struct's field, a list's item."""
    if name is not None and isinstance(info, msgspec.inspect.StructType):
        found = next((f.type for f in info.fields if f.encode_name == name), None)
        if found is not None:
            return found
    elif index is not None and isinstance(info, msgspec.inspect.ListType):
        return info.item_type
    raise LookupError(name or index)


def _fault(backend: Backend, what: str, exc: BaseException) -> PluginFault:
    """A backend method's failure at run time (`what`: `check_new_params
    raised`), logged once naming the backend and the exception's type."""
    said = f"backend {backend.name!r}: {what} {type(exc).__name__} (a bug in its plugin)"
    log.error("%s", said)
    return PluginFault(said)


def _backend_fault(backend: Any) -> str | None:
    """Why `backend`, offered by `tether_backends`, cannot be used; None if
    it can."""
    if isinstance(backend, type):
        instance = f" (offer {backend.__qualname__}())" if issubclass(backend, Backend) else ""
        return f"tether_backends offered {_kind(backend)}, not an instance of it{instance}"
    if not isinstance(backend, Backend):
        return f"tether_backends offered {_kind(backend)}, not a core.plugin.Backend"
    kind = type(backend).__qualname__
    name = getattr(backend, "name", None)
    if name is None:
        return f"backend {kind} has no `name`"
    if not isinstance(name, str) or not BACKEND_NAME.fullmatch(name):
        named = shown(name) if isinstance(name, str) else _kind(name)
        return f"backend {kind} is named {named}; a backend's name is {BACKEND_NAME_RULE}"
    params_type = getattr(backend, "params_type", None)
    if params_type is None:
        return f"backend {name!r} has no `params_type` (a msgspec Struct of its jobs' params)"
    try:
        info = msgspec.inspect.type_info(params_type)
    except Exception as exc:
        return (
            f"backend {name!r}: its params_type is {_kind(params_type)}, not a type msgspec"
            f" converts to ({type(exc).__name__})"
        )
    if not _takes_an_object(info):
        named = params_type.__qualname__ if isinstance(params_type, type) else repr(params_type)
        return (
            f"backend {name!r}: its params_type {named} takes no JSON object, and a job's params"
            " are one: every job would be refused (make it a msgspec Struct)"
        )
    for method in PLAIN_METHODS:
        if inspect.iscoroutinefunction(getattr(backend, method)):
            return (
                f"backend {name!r}: its {method} is an async def; Tether calls it without"
                " awaiting it, so its answer would be lost: make it a plain def"
            )
    return None


def _takes_an_object(info: msgspec.inspect.Type) -> bool:
    """Whether a type (as `msgspec.inspect` describes it) takes a JSON
    object, as every job's `params` are: a Struct (not `array_like`), a
    dataclass, a TypedDict, an attrs class, a dict, `Any`, or a union or an
    `Annotated` of one. (`params_type = int` was taken at start, and every
    job refused with 422.)"""
    match info:
        case msgspec.inspect.StructType():
            return not info.array_like
        case (
            msgspec.inspect.DataclassType()
            | msgspec.inspect.TypedDictType()
            | msgspec.inspect.DictType()
            | msgspec.inspect.AnyType()
        ):
            return True
        case msgspec.inspect.CustomType():  # `object` converts as `Any` does (a review)
            return info.cls is object
        case msgspec.inspect.Metadata():
            return _takes_an_object(info.type)
        case msgspec.inspect.UnionType():
            return any(_takes_an_object(member) for member in info.types)
    return False


PLAIN_METHODS = sorted(
    name
    for name, value in vars(Backend).items()
    if inspect.isfunction(value)
    and not name.startswith("_")
    and not inspect.iscoroutinefunction(value)
)
"""The `Backend` methods Tether calls without awaiting: one a plugin wrote as
`async def` would answer a coroutine that never runs (a `check_new_params`
that refuses nothing, an outcome never read), so it is refused at start-up.
The awaited ones are not checked: a plain def answering an awaitable is
as good as an async def."""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"
