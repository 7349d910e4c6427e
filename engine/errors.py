"""The one exception type for user mistakes: the command line prints its message as a single line; and how to
tell a Ctrl-C from an error."""


class UserError(Exception):
    """Bad input the user can fix (a missing file, a wrong argument, an unreachable camera).

    The message must say what is wrong and how to fix it, in one line, without a traceback.
    """


def caused_by_ctrl_c(error: BaseException) -> bool:
    """Whether ``error`` is a Ctrl-C or was raised because of one. A Ctrl-C that lands while a compiled (numba)
    kernel returns its result surfaces as a ``SystemError`` caused by the ``KeyboardInterrupt``."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
