"""The one exception type users see: a message that names the problem and the fix."""


class InfluenceError(Exception):
    """Bad input or a mismatched artifact. The CLI prints the message on one line and exits 2."""

    def __str__(self) -> str:
        # Messages often quote a library's multi-line error; the one-line contract holds for them too. Only newlines
        # join lines: other control characters (a carriage return in a file name) stay, for the CLI to show escaped.
        return " ".join(line.strip() for line in super().__str__().split("\n") if line.strip())
