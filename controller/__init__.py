"""aifactory's Kubernetes-agnostic core: topology, queue, scheduler, power model, backends."""

__version__ = "0.1.0"
