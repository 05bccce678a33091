"""``lorakit train``: the command and its flags, generated from the declared options of the core
and of every installed arch, objective and mode; :mod:`lorakit.cli` registers it."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import List

import typer


def train(**values):
    """Train a LoRA."""
    from lorakit.cli import _main_process, _quiet_libraries, _run, _setup_logging

    _quiet_libraries()
    _setup_logging()
    from lorakit.config import build_config

    config_file = values.pop("config_file", None)
    print_config = values.pop("print_config", None)
    values = {k: (None if isinstance(v, (list, tuple)) and not v else v) for k, v in values.items()}  # a repeatable flag not given
    modes = [m for m in _mode_flags() if values.pop(_mode_param(m), None)]
    values["modes"] = modes or None
    if values.get("output") is not None:
        values["output"] = str(values["output"])

    def go():
        config = build_config(values, str(config_file) if config_file else None)
        if print_config:
            from lorakit.config import config_yaml

            return config_yaml(config)
        from lorakit.progress import make_progress
        from lorakit.training import train as run_training

        try:
            return run_training(config, progress=make_progress())
        finally:
            if _end_process_group():
                _skip_teardown_at_exit()

    try:
        result = _run(go)
    except typer.Exit as exc:
        _EXIT_CODE[0] = exc.exit_code
        raise
    _EXIT_CODE[0] = 0
    if isinstance(result, str):  # --print-config
        typer.echo(result, nl=False)
        return
    if _main_process():  # under accelerate launch every process returns here: one line, not one each
        typer.echo(f"saved {result.weights} ({result.global_step} steps)")


def _end_process_group() -> bool:
    """Under ``accelerate launch`` each process leaves the process group before it exits: a
    process that exits holding it can be aborted by the backend's threads ("terminate called
    without an active exception", SIGABRT) and the launcher then fails the whole run.
    Returns whether there was a group (the run was launched)."""
    dist = sys.modules.get("torch.distributed")  # not imported: no group to leave
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False


#: the exit status of a launched process, for :func:`_skip_teardown_at_exit` (1 until known)
_EXIT_CODE = [1]


def _skip_teardown_at_exit() -> None:
    """A launched process's work is done (files written, the group left): at interpreter exit,
    flush and leave with its status at once, before module teardown and C++ static destructors.
    Leaving the group is not always enough: now and then a launched run still aborted in that
    teardown (SIGABRT, "terminate called without an active exception", twice in this project's
    CI runs) after training and saving had succeeded, and the launcher failed the run. Registered last, this runs
    first among the exit handlers; lorakit's trackers and uploads have finished before."""
    import atexit
    import logging
    import os

    def leave():
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed stream: nothing left to flush
                pass
        os._exit(_EXIT_CODE[0])

    atexit.register(leave)


def _mode_param(mode: str) -> str:
    return "mode_" + mode.replace("-", "_")


def _mode_flags() -> dict:
    """``{mode id: one-line help}`` of every installed mode (a broken one is left out)."""
    from lorakit.plugins import mode_entries

    out = {}
    for mode, entry in mode_entries().items():
        try:
            plugin = entry.load()
        except Exception:
            continue
        text = getattr(plugin, "description", None) or (plugin.__doc__ or "").strip().splitlines()[0:1]
        out[mode] = text if isinstance(text, str) else (text[0] if text else f"Mode {mode}.")
    return out


def _train_parameters() -> list:
    """``lorakit train``'s parameters, generated from the declared options of the core and of
    every installed arch, objective and mode (one place per option)."""
    import inspect
    from typing import Optional as Opt

    from lorakit.config import CORE_OPTIONS
    from lorakit.plugins import all_options

    python_type = {bool: bool, int: int, float: float, str: str, list: str}
    seen, params = set(), []
    owners: dict = {}  # an option several archs declare (e.g. a text length) with their defaults
    for owner, options in all_options():
        for option in options:
            owners.setdefault(option.name, []).append((owner, option))

    def add(option):
        if option.name in seen:
            return
        seen.add(option.name)
        declared = owners.get(option.name, [])
        panel, shown = option.panel, option.shown_default()
        if len({o.shown_default() for _, o in declared}) > 1:
            panel = "Options of several archs"
            shown = "; ".join(f"{o.shown_default()} with {who.lstrip('-').replace('arch ', '--arch ')}" for who, o in declared)
        choices = f" One of: {', '.join(map(str, option.choices))}." if option.choices else ""
        help_text = (option.help + choices).replace("[", "\\[") + f" \\[default: {shown}]"
        param = typer.Option(None, *option.cli_flags(), help=help_text, rich_help_panel=panel, show_default=False)
        kind = List[str] if option.multiple else python_type[option.type]  # multiple: --x A --x B
        params.append(
            inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=param, annotation=Opt[kind])
        )

    for option in CORE_OPTIONS:
        add(option)
    params.append(inspect.Parameter(
        "config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Opt[Path],
        default=typer.Option(None, "--config", help="TOML, YAML or JSON file of options (keys as the flags); flags win.",
                             rich_help_panel="Run"),
    ))
    params.append(inspect.Parameter(
        "print_config", inspect.Parameter.KEYWORD_ONLY, annotation=Opt[bool],
        default=typer.Option(None, "--print-config", help="Print the resolved options as a YAML config file "
                             "(for --config) and exit without training.", rich_help_panel="Run"),
    ))
    for mode, text in _mode_flags().items():
        params.append(inspect.Parameter(
            _mode_param(mode), inspect.Parameter.KEYWORD_ONLY, annotation=Opt[bool],
            default=typer.Option(None, f"--{mode}", help=text.replace("[", "\\["), rich_help_panel="Modes"),
        ))
    for _owner, options in all_options():
        for option in options:
            add(option)
    return params


class _LazyTrain:
    """``train`` with a signature built on first use: only ``lorakit train`` (and its --help, the
    docs, the Python API) pays for loading every plugin's declarations; ``list-archs`` and
    ``--help`` of other commands see an empty one (see :func:`main`)."""

    __name__ = __qualname__ = "train"
    __doc__ = train.__doc__
    __module__ = __name__
    light = False

    def __call__(self, **values):
        return train(**values)

    @functools.cached_property
    def _params(self):
        return _train_parameters()

    @property
    def __signature__(self):
        import inspect

        return inspect.Signature([] if self.light else self._params)

    @property
    def __annotations__(self):
        return {} if self.light else {p.name: p.annotation for p in self._params}
