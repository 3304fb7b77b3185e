"""The command line's own error class (the inputs layer's `InputError` and the loaders' ValueErrors are reported the
same way: one line, exit status 2)."""


class CLIError(Exception):
    """A problem with the command line's flags or paths, reported without a traceback."""
