"""gpserve: a GraphPipe inference server (codec, HTTP fronts, batching workers, row cache)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gpserve")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

