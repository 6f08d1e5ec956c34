import torch

def clamp_to_nearest_level(weights, levels):
    """Move every weight to the nearest quantisation level (on a tie, the lower level)."""
    distance = (weights.unsqueeze(-1) - levels).abs()  # shape (*weights.shape, len(levels))
    return levels[distance.argmin(dim=-1)]
