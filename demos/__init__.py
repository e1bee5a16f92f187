"""Demonstrations: teleop devices, the recorder, and the episode dataset format."""
