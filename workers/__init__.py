"""Worker processes and model backends (installed as ``gpserve.workers``)."""
