"""Reproducible scenarios that print the numbers the README quotes (see README.md here)."""
