"""Agents: DrQ-v2 and SERL-style RLPD behind one interface (robolearn.agents.base.Agent)."""
