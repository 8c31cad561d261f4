"""Virtual time: the simulator, fill-until-full, and time series of a simulated run."""
