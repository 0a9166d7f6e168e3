"""FLARE provisioning: thin adapters between FLARE and the zenfed core."""
