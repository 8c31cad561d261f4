"""Nouns and invariants every layer shares: job specs, the topology tree, cluster usage, errors,
units, the clock."""
