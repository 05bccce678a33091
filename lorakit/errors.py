"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class LorakitError(Exception):
    """A problem with the user's input, stated with the fix: shown without a traceback."""


class PluginError(LorakitError):
    """A plugin is missing, broken, duplicated or incomplete."""
