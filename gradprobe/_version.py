"""gradprobe's version, in a module of its own: the stages, the CLI and pyproject.toml read it
here without importing the package's API (and torch with it)."""

__version__ = "0.1.0"
