"""The Ray backend: one placement group per gang, bundles pinned to the chosen nodes, detached
workers."""
