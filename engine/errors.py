"""The one exception type for user mistakes: the command line prints its message as a single line."""


class UserError(Exception):
    """Bad input the user can fix (a missing file, a wrong argument, an unreachable camera).

    The message must say what is wrong and how to fix it, in one line, without a traceback.
    """
