"""The one exception type users see: a message that names the problem and the fix."""


class InfluenceError(Exception):
    """Bad input or a mismatched artifact. The CLI prints the message on one line and exits 2."""
