"""FLARE executors: thin adapters between FLARE and the zenfed core."""
