"""The one error every CLI command reports as `tokenworks: <message>` with exit status 1."""


class AdminError(Exception):
    """The gateway refused or could not be reached; the message says which and why."""
