"""The aifactory command line: the composition root that wires inputs, runtime, sim, observe and
operators."""
