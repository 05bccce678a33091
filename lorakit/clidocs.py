"""docs/cli.md, generated from the CLI itself (which is generated from the option declarations).

``python -m lorakit.clidocs > docs/cli.md`` rewrites it; a test keeps the file equal to what
this prints, so the reference can never lag behind a declared option.
"""

from __future__ import annotations

INTRO = (
    "`lorakit --help` and `lorakit COMMAND --help` print the same. Flags given on the command line "
    "override a `--config` file (TOML, YAML or JSON; keys are the flags without `--`, dashes or "
    "underscores), which overrides the defaults shown. `lorakit train` accepts the core's options "
    "plus those of the chosen arch, of its objective and of the modes turned on; any other is "
    "refused in one line naming whose option it is. This page is generated: "
    "`python -m lorakit.clidocs > docs/cli.md`."
)
OUTRO = (
    "Errors a user can cause (bad paths, bad data, wrong architecture, an output folder holding an "
    "earlier run, ...) print one line starting with `error:` and exit with status 1; Ctrl-C saves a "
    "checkpoint of the finished steps, exits with 130 and says how to resume."
)


def _cell(text: str) -> str:
    return " ".join(text.replace("\\[", "[").replace("|", "&#124;").split())


def _flags(param) -> str:
    spelled = [f"`{o}`" for o in param.opts] + [f"`{o}`" for o in param.secondary_opts]
    return " / ".join(spelled)


def render() -> str:
    import typer
    from typer.core import TyperArgument, TyperOption

    from lorakit.cli import app

    lines = ["# Command reference", "", INTRO, ""]
    for name, command in typer.main.get_command(app).commands.items():
        lines += [f"## `lorakit {name}`", "", _cell((command.help or "").strip().splitlines()[0]), ""]
        arguments = [p for p in command.params if isinstance(p, TyperArgument)]
        if arguments:
            described = "; ".join(f"`{p.name.upper()}` — {_cell(getattr(p, 'help', '') or '')}" for p in arguments)
            lines += [f"Arguments: {described}", ""]
        panels: dict = {}
        for param in command.params:
            if isinstance(param, TyperOption) and param.name != "help":
                panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(param)
        for panel, params in panels.items():
            if len(panels) > 1:
                lines += [f"### {panel}", ""]
            lines += ["| option | meaning |", "| --- | --- |"]
            lines += [f"| {_flags(p)} | {_cell(p.help or '')} |" for p in params]
            lines.append("")
    lines += [OUTRO, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
