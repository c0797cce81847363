"""The reliability suite: a live `pagoda serve` on 127.0.0.1 under a fuzzer (schemathesis over
its own /openapi.json), hostile input, client disconnects, overload and SIGTERM under load.
Every test is bounded in requests and seconds so the suite runs in CI."""
