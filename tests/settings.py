"""Agent settings that more than one test module trains with."""

from __future__ import annotations

from robolearn.agents.serl import CPU_OVERRIDES

# DroQ at UTD 4 (bench/agent_variants.py's droq_utd4): SERL's CPU setting with critic dropout 0.01 and half the
# critic steps per env step. On PickCube from 20 demos it reached 90% at 4000 env steps on 4 of 5 seeds (7000 on
# the fifth), as UTD 8 does, in 2.3-2.5 minutes instead of 3.4 (docs/agent_variants.md). The learning tests use
# it to reach their targets in half the CPU time.
DROQ_UTD4 = {**CPU_OVERRIDES, "utd_ratio": 4, "critic_dropout": 0.01}


def launch_list(overrides: dict) -> str:
    """`overrides` as a launch argument of KEY=VALUE strings (sim_train.launch.xml's agent_set)."""
    return "[" + ", ".join(f"'{k}={v}'" for k, v in overrides.items()) + "]"
