"""The power model: GPU power curves and their fit to measurements, utilisation, watts estimates
for admission."""
