"""Files to specs: SimulatedFactory YAML, job manifests, public cluster traces, the shared data
folder."""
