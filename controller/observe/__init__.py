"""Observability: GPU telemetry, snapshots of the plane, metric families, the Prometheus exporter,
reports."""
