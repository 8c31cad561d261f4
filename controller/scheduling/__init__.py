"""One scheduling cycle over an immutable snapshot: its inputs and outputs, preemption, quotas."""
