import torch

def core_by_fraction_mask(weight, fraction):
    """Mask that zeroes the smallest `fraction` of the weights by magnitude (1 = keep, 0 = pruned)."""
    k = round(fraction * weight.numel())  # how many weights to prune, as torch.nn.utils.prune counts them
    mask = torch.ones_like(weight)
    if k > 0:
        smallest = torch.topk(weight.abs().flatten(), k, largest=False).indices
        mask.view(-1)[smallest] = 0
    return mask
