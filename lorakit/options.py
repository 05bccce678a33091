"""Options, declared once by whoever defines them: the core, an objective, an arch or a mode.

An :class:`Option` carries everything the command line, config files, docs/cli.md and the
resume check need (name, type, default, help, allowed values, whether a resume must
match). ``lorakit train``'s flags are generated from the declarations of the installed
plugins; a run accepts the core's options plus those of its arch, the arch's objective
and its modes, and refuses any other in one line. Nothing here imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorakit.errors import LorakitError

#: Value types an option may have.
TYPES = (bool, int, float, str, list)


@dataclass(frozen=True)
class Option:
    #: Python name, as read from the config (``config.learning_rate``).
    name: str
    #: ``bool``, ``int``, ``float``, ``str`` or ``list`` (a list of strings; comma-separated on the CLI).
    type: type
    #: The value when the user gives none. ``None`` means "not set" (the help says what that does).
    default: object = None
    #: One sentence for ``--help`` and docs/cli.md; say what ``None`` means where it matters.
    help: str = ""
    #: Allowed values, if the option is a choice.
    choices: tuple = ()
    #: Smallest allowed value (numbers), and whether it is excluded.
    minimum: float | None = None
    exclusive_minimum: bool = False
    #: Largest allowed value (numbers), and whether it is excluded.
    maximum: float | None = None
    exclusive_maximum: bool = False
    #: A checkpoint of a run with another value is refused on ``--resume``.
    resume: bool = False
    #: Help panel (``--help`` groups options by it).
    panel: str = "Options"
    #: Command-line spellings; default ``--name-with-dashes`` (``--x/--no-x`` for booleans).
    flags: tuple = ()
    #: Other config-file keys accepted for this option.
    aliases: tuple = ()
    #: Shown in the help instead of the default (e.g. "the model's native size").
    default_text: str | None = None
    #: A ``list`` option whose items may hold commas (prompts): repeat the flag on the CLI
    #: (``--x A --x B``); a config file gives a list or one string, never split at commas.
    multiple: bool = False

    def __post_init__(self):
        if self.type not in TYPES:
            raise TypeError(f"option {self.name}: type must be one of {TYPES}, not {self.type!r}")

    @property
    def flag(self) -> str:
        """The main command-line spelling, as error messages name it."""
        if self.flags:
            return self.flags[0].split("/")[0]
        return "--" + self.name.replace("_", "-")

    def cli_flags(self) -> tuple:
        if self.flags:
            return self.flags
        dashed = self.name.replace("_", "-")
        return (f"--{dashed}/--no-{dashed}",) if self.type is bool else (f"--{dashed}",)

    def keys(self) -> tuple:
        """Config-file keys: the name, with dashes or underscores, and the aliases."""
        names = {self.name, self.name.replace("_", "-"), self.flag.lstrip("-"), self.flag.lstrip("-").replace("-", "_")}
        for alias in self.aliases:
            names |= {alias, alias.replace("_", "-"), alias.replace("-", "_")}
        return tuple(sorted(names))

    def shown_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if self.default is None:
            return "off"
        if self.type is bool:
            return "yes" if self.default else "no"
        if self.type is list:
            return (" | " if self.multiple else ",").join(self.default) or "none"
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)

    # -- values ---------------------------------------------------------------------------

    def coerce(self, value, where: str):
        """``value`` as this option's type (a YAML string "1e-4" is a fine float), or one error line."""
        if value is None:
            return None
        kind = self.type
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise LorakitError(f"{where}: '{self.flag.lstrip('-')}' must be true or false, got {value!r}.")
        if kind is list:
            if isinstance(value, str) and self.multiple:
                return [value]
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return list(value)
            raise LorakitError(
                f"{where}: '{self.flag.lstrip('-')}' must be a list of names (or one comma-separated string), got {value!r}."
            )
        if kind is str:
            if isinstance(value, str):
                return value
            raise LorakitError(f"{where}: '{self.flag.lstrip('-')}' must be a string, got {value!r}.")
        if isinstance(value, bool):
            value = repr(value)  # True is not a number a user means
        if kind is int:
            if isinstance(value, int):
                return value
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    pass
            raise LorakitError(f"{where}: '{self.flag.lstrip('-')}' must be a whole number, got {value!r}.")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise LorakitError(f"{where}: '{self.flag.lstrip('-')}' must be a number, got {value!r}.")

    def check(self, value) -> None:
        """Refuse a value outside the declared choices or range, in one line naming the flag."""
        if value is None:
            return
        if self.choices and value not in self.choices:
            raise LorakitError(f"{self.flag} must be one of {', '.join(map(str, self.choices))}, got '{value}'.")
        if self.type in (int, float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise LorakitError(f"{self.flag} must be a finite number, got {value}.")
            low, high = self.minimum, self.maximum
            if low is not None and (value < low or (self.exclusive_minimum and value == low)):
                raise LorakitError(f"{self.flag} must be {_bound(self, low, high)}, got {value:g}.")
            if high is not None and (value > high or (self.exclusive_maximum and value == high)):
                raise LorakitError(f"{self.flag} must be {_bound(self, low, high)}, got {value:g}.")


def _bound(option: Option, low, high) -> str:
    parts = []
    if low is not None:
        parts.append(("> " if option.exclusive_minimum else ">= ") + f"{low:g}")
    if high is not None:
        parts.append(("< " if option.exclusive_maximum else "<= ") + f"{high:g}")
    if high is None and option.type is int and low == 1 and not option.exclusive_minimum:
        return "a positive integer"
    if high is None and low == 0 and option.exclusive_minimum:
        return "positive"
    return " and ".join(parts)


def by_name(options) -> dict:
    """``{name: Option}``; a name declared twice is a plugin bug, named."""
    out = {}
    for option in options:
        if option.name in out and out[option.name] != option:
            raise LorakitError(f"option '{option.name}' is declared twice with different meanings; rename one.")
        out[option.name] = option
    return out
