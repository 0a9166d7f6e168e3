"""FLARE controllers: thin adapters between FLARE and the zenfed core."""
