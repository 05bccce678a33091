"""Finding, loading and checking plugins.

Arch plugins come from the ``lorakit.archs`` entry-point group (name = arch id), mode
plugins from ``lorakit.modes``. Discovery reads entry-point metadata only; a plugin is
imported when it is used, and one that fails to import is reported with its error
instead of taking the CLI down. Every run gets a fresh :func:`get_plugin_manager`.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

import pluggy

from lorakit import hookspecs
from lorakit.errors import PluginError

ARCH_GROUP = "lorakit.archs"
MODE_GROUP = "lorakit.modes"


@dataclass
class PluginEntry:
    name: str
    value: str
    group: str
    distribution: str
    version: str
    _entry_point: object = None
    _loaded: object = None
    _error: str | None = None

    def load(self):
        """Import the plugin object once; raise PluginError naming it if that fails."""
        if self._loaded is None and self._error is None:
            try:
                self._loaded = self._entry_point.load() if self._entry_point else None
            except Exception as exc:  # any import-time failure makes the plugin "broken"
                self._error = f"{type(exc).__name__}: {exc}"
        if self._error is not None:
            raise PluginError(
                f"plugin '{self.name}' ({self.value}, from {self.distribution} {self.version}) "
                f"failed to import: {self._error}. Reinstall or fix that package."
            )
        return self._loaded


_cache: dict[str, dict[str, PluginEntry]] = {}
_extra: dict[str, dict[str, PluginEntry]] = {ARCH_GROUP: {}, MODE_GROUP: {}}


def _discover(group: str) -> dict[str, PluginEntry]:
    if group not in _cache:
        found: dict[str, PluginEntry] = {}
        duplicates: dict[str, list[str]] = {}
        for ep in importlib.metadata.entry_points(group=group):
            dist = getattr(ep, "dist", None)
            entry = PluginEntry(
                name=ep.name,
                value=ep.value,
                group=group,
                distribution=dist.metadata["Name"] if dist else "?",
                version=dist.version if dist else "?",
                _entry_point=ep,
            )
            if ep.name in found and found[ep.name].value != ep.value:
                duplicates.setdefault(ep.name, [found[ep.name].distribution]).append(entry.distribution)
                entry._error = (
                    f"arch id '{ep.name}' is registered twice (by {', '.join(duplicates[ep.name])}); "
                    "uninstall one of them"
                )
            found[ep.name] = entry
        _cache[group] = found
    merged = dict(_cache[group])
    merged.update(_extra[group])
    return merged


def arch_entries() -> dict[str, PluginEntry]:
    """Installed arch plugins by id, sorted. Imports nothing."""
    return dict(sorted(_discover(ARCH_GROUP).items()))


def mode_entries() -> dict[str, PluginEntry]:
    return dict(sorted(_discover(MODE_GROUP).items()))


def register(arch_id: str, plugin, *, group: str = ARCH_GROUP) -> None:
    """Register a plugin object in-process (tests, notebooks) as if it had an entry point."""
    _extra[group][arch_id] = PluginEntry(arch_id, repr(plugin), group, "(runtime)", "-", None, plugin)


def unregister(arch_id: str, *, group: str = ARCH_GROUP) -> None:
    _extra[group].pop(arch_id, None)


def _new_manager() -> pluggy.PluginManager:
    from lorakit import defaults

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(defaults, name="lorakit.defaults")
    return pm


def _instance(plugin):
    """A plugin given as a class gets a fresh instance per manager (per run), so it may keep
    run state (a mode plugin remembers the manager it wraps); modules are used as they are."""
    return plugin() if isinstance(plugin, type) else plugin


def get_plugin_manager(arch: str, modes: tuple[str, ...] | list[str] = ()) -> pluggy.PluginManager:
    """A fresh manager holding lorakit's defaults, the arch plugin ``arch`` and ``modes``."""
    archs = arch_entries()
    if arch not in archs:
        known = ", ".join(archs) or "none installed"
        raise PluginError(f"unknown arch '{arch}'. Known archs: {known}. See `lorakit list-archs`.")
    pm = _new_manager()
    pm.register(_instance(archs[arch].load()), name=f"arch:{arch}")
    available_modes = mode_entries()
    for mode in modes:
        if mode not in available_modes:
            known = ", ".join(available_modes) or "none installed"
            raise PluginError(f"unknown mode '{mode}'. Known modes: {known}.")
        pm.register(_instance(available_modes[mode].load()), name=f"mode:{mode}")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin for arch '{arch}' implements an unknown hook: {exc}") from None
    return pm


def missing_hooks(pm: pluggy.PluginManager, required=hookspecs.REQUIRED_TRAIN_HOOKS) -> list[str]:
    """Required hooks without an implementation (``a or b`` for a pair of alternatives)."""
    missing = []
    for entry in required:
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        if not any(getattr(pm.hook, name).get_hookimpls() for name in names):
            missing.append(" or ".join(names))
    return missing


def require_hooks(pm: pluggy.PluginManager, arch: str, required=hookspecs.REQUIRED_TRAIN_HOOKS) -> None:
    missing = missing_hooks(pm, required)
    if missing:
        raise PluginError(
            f"arch plugin '{arch}' does not implement required hook(s): {', '.join(missing)}. "
            "See docs/plugins.md."
        )


def arch_info(arch: str):
    """The ArchInfo of one arch (imports its plugin module, not torch)."""
    pm = get_plugin_manager(arch)
    info = pm.hook.arch_info()
    if info is None:
        raise PluginError(f"arch plugin '{arch}' does not implement arch_info. See docs/plugins.md.")
    return info


def mode_options(mode: str) -> list:
    """The options a mode declares (its ``declare_options`` hook), in declaration order."""
    modes = mode_entries()
    if mode not in modes:
        known = ", ".join(modes) or "none installed"
        raise PluginError(f"unknown mode '{mode}'. Known modes: {known}.")
    pm = _new_manager()
    pm.register(_instance(modes[mode].load()), name=f"mode:{mode}")
    return [option for declared in pm.hook.declare_options() for option in declared]


def _owners():
    """``(owner description, [Option])`` for every installed arch, objective and mode; a plugin
    that fails to load is skipped (``list-archs`` reports it)."""
    from lorakit.objectives import OPTIONS

    owners = []
    infos = {}
    for arch_id in arch_entries():
        try:
            infos[arch_id] = arch_info(arch_id)
        except Exception:
            continue
        owners.append((f"--arch {arch_id}", list(infos[arch_id].options)))
    for family, options in OPTIONS.items():
        users = [a for a, i in infos.items() if i.objective == family]
        owners.append((f"the {family} objective (--arch {', '.join(users) or 'none installed'})", list(options)))
    for mode in mode_entries():
        try:
            owners.append((f"mode {mode} (--{mode})", mode_options(mode)))
        except Exception:
            continue
    return owners


def declared_elsewhere(name: str, arch: str, modes=()) -> str | None:
    """Who declares option ``name`` when the run (``arch`` + ``modes``) does not, for messages."""
    for owner, options in _owners():
        if any(o.name == name for o in options):
            return owner
    return None


def all_options() -> list[tuple[str, list]]:
    """Every installed plugin's options, grouped by owner (for the CLI and docs/cli.md)."""
    return _owners()


def list_archs() -> list[dict]:
    """Every installed arch with its status; a broken plugin is reported, never raised."""
    rows = []
    for arch_id, entry in arch_entries().items():
        row = {
            "id": arch_id,
            "description": "",
            "distribution": entry.distribution,
            "version": entry.version,
            "status": "ok",
            "error": None,
        }
        try:
            pm = get_plugin_manager(arch_id)
            info = pm.hook.arch_info()
            if info is None:
                raise PluginError(f"arch plugin '{arch_id}' does not implement arch_info. See docs/plugins.md.")
            row["description"] = info.description
            missing = missing_hooks(pm)
            if missing:
                row["status"] = "broken"
                row["error"] = f"missing hook(s): {', '.join(missing)}"
        except Exception as exc:
            row["status"] = "broken"
            row["error"] = str(exc)
        rows.append(row)
    return rows
