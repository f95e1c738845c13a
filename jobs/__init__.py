"""Ray pipelines: wire Ray to the stage functions of `influence/` and `indexes/` (no math here).

With no address a local Ray cluster starts on this machine; with `address` (or RAY_ADDRESS) the same
job runs on an existing cluster.
"""
