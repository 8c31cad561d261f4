"""The control plane that drives any backend in real or virtual time, its measurements, recovery
and autoscaling."""
