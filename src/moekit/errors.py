"""The one exception type users see: a message that names the problem and the fix."""


class MoekitError(Exception):
    """A problem with the user's input, reported before any heavy work starts.

    The message always says what is wrong and what to do instead; the CLI prints it
    without a traceback.
    """


class UnsupportedModelError(MoekitError):
    """The model is not an MoE family moekit knows, or has no routed-expert layers."""
