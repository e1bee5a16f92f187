"""Panda tasks: each adds its objects to the workcell, resets them, scores, and has an expert."""
