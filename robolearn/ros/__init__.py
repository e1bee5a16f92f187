"""robolearn."""
