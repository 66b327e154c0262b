"""diffkern.poe_bridge (being built)."""
