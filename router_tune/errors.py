"""The one exception type that reaches a user as a plain message instead of a traceback."""


class RouterTuneError(Exception):
    """A problem with the user's input (path, checkpoint, recipe, data) that they can fix.

    The message is written for a person: what is wrong, then how to fix it. The CLI prints
    it as one paragraph and exits with status 1; library callers can catch it.
    """
