"""``lethe demo``: the main job end to end on the embedded default (not shipped in the service image)."""
