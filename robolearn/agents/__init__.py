"""Agents behind one interface (robolearn.agents.base.Agent), found by name in robolearn.agents.registry:
DrQ-v2, SERL-style RLPD, and a diffusion policy."""
