"""The category of every warning gradprobe gives, in a module that imports nothing: the probe,
the diagnosis and a test suite (``filterwarnings = error::gradprobe.GradprobeWarning``) all name
it without importing torch."""


class GradprobeWarning(UserWarning):
    """Something gradprobe noticed or could not do; training (or the analysis) continues."""


class GradprobeDeprecationWarning(GradprobeWarning, FutureWarning):
    """A gradprobe name or argument that still works and will be removed."""
