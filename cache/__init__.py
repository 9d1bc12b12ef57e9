"""The LMDB row cache, shared by all front processes (installed as ``gpserve.cache``)."""
