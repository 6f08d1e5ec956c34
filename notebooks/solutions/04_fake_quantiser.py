import torch

def my_fake_quantise(x, scale, zero_point, quant_min, quant_max):
    """Quantise to integer codes and straight back, exactly as PyTorch does."""
    q = torch.round(x * (1.0 / scale)) + zero_point  # torch.round: ties go to the even integer
    q = torch.clamp(q, quant_min, quant_max)
    return (q - zero_point) * scale
