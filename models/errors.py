"""Errors that the models package raises for bad inputs (as opposed to bugs, which assert)."""


class ModelLoadError(ValueError):
    """A checkpoint, config or tokenizer cannot be used.

    The message is one line that names the offending file (or field) and says how to fix it,
    so the CLI can print it as-is after ``Error:``.
    """
