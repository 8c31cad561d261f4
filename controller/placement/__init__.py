"""Where one gang goes: request resolution, topology-aware placement, reasons, fragmentation, and
the baseline policies."""
