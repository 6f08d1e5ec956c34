def pack_values(values, bits):
    """Pack unsigned integers of `bits` bits into bytes, least significant bit first."""
    out = bytearray()
    acc, filled = 0, 0  # bit accumulator and how many of its bits are in use
    for v in values:
        acc |= int(v) << filled
        filled += bits
        while filled >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            filled -= 8
    if filled:
        out.append(acc & 0xFF)
    return bytes(out)
