"""The Kubernetes face of aifactory: kopf handlers, the engine that drives the core, and the
translation between custom resources and the core's model. Depends on ``controller``, never
the other way round (the CLI's lazy ``aifactory operator`` hook is the one exception)."""
