"""Controllers: Cartesian impedance, operational space, differential IK, and the safety layer."""
