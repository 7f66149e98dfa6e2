"""Tests of this kind: real worker processes, servers and crashes: concurrency, chaos, the
relay with Redis, the embedded server."""
