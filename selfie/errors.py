"""The one exception type users see: a single line naming the file, row or key at fault."""


class SelfieError(Exception):
    """Bad user input. The CLI prints `selfie: error: <message>` and exits with status 2."""
