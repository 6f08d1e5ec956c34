"""Huffman-coded weight storage: exact round trips, sizes on file equal to the report's, and its decoding cost."""

import hashlib
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nnlab
from nnlab import nna
from nnlab.nna import entropy


# ----------------------------------------------------------------------------- the coder
@settings(max_examples=120, deadline=None)
@given(alphabet=st.integers(1, 300), n=st.integers(0, 2000), skew=st.floats(0.05, 5.0), seed=st.integers(0, 2 ** 31))
def test_huffman_roundtrip_random_symbols(alphabet, n, skew, seed):
    rng = np.random.default_rng(seed)
    symbols = rng.choice(alphabet, n, p=rng.dirichlet(np.full(alphabet, skew)))
    table, codes = entropy.encode(symbols, alphabet)
    np.testing.assert_array_equal(entropy.decode(table, codes, n), symbols)
    counts = np.bincount(symbols, minlength=alphabet)
    lengths = entropy.huffman_code_lengths(counts)
    assert table.size == entropy.table_bytes(lengths)
    assert codes.size == (entropy.coded_bits(counts, lengths) + 7) // 8
    used = lengths[counts > 0]
    if used.size > 1:  # an optimal prefix code is complete: Kraft's sum is exactly 1
        assert np.sum(2.0 ** -used) == pytest.approx(1.0)


def test_huffman_lengths_and_canonical_codes():
    lengths = entropy.huffman_code_lengths(np.array([10, 1, 1, 2, 0]))
    assert lengths.tolist() == [1, 3, 3, 2, 0]
    assert entropy.canonical_codes(lengths).tolist() == [0b0, 0b110, 0b111, 0b10, 0]
    # never longer on average than a fixed-width field, and below it on a skewed distribution
    counts = np.array([800, 100, 50, 30, 10, 5, 3, 2])
    lengths = entropy.huffman_code_lengths(counts)
    assert entropy.coded_bits(counts, lengths) < 3 * counts.sum()


def test_huffman_single_symbol_and_empty():
    table, codes = entropy.encode(np.full(100, 5), 16)
    assert codes.size == 13  # one bit per symbol
    np.testing.assert_array_equal(entropy.decode(table, codes, 100), np.full(100, 5))
    with pytest.raises(ValueError, match="no valid code"):  # the lone code is 0: a 1 bit is no code
        entropy.decode(table, np.array([0xFF], np.uint8), 8)
    table, codes = entropy.encode([], 16)
    assert codes.size == 0 and entropy.decode(table, codes, 0).size == 0
    with pytest.raises(ValueError, match="damaged Huffman stream"):
        entropy.decode(table, np.zeros(1, np.uint8), 0)
    with pytest.raises(ValueError, match="symbols must lie in"):
        entropy.encode([16], 16)
    with pytest.raises(ValueError, match="counts must be"):
        entropy.huffman_code_lengths(np.array([1, -1]))


def test_huffman_refuses_a_damaged_stream():
    symbols = np.random.default_rng(0).choice(4, 50, p=[0.7, 0.2, 0.05, 0.05])
    table, codes = entropy.encode(symbols, 4)
    with pytest.raises(ValueError, match="damaged Huffman stream"):
        entropy.decode(table, codes[:-2], 50)  # truncated
    with pytest.raises(ValueError, match="damaged Huffman stream"):
        entropy.decode(table, np.concatenate([codes, np.zeros(2, np.uint8)]), 50)  # trailing bytes


# ----------------------------------------------------------------------------- the weight format
@pytest.mark.parametrize("bits", [4, 5, 8, 16])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.3, 1.0])
def test_huffman_weights_roundtrip(bits, density):
    rng = np.random.default_rng(bits)
    top = (1 << (bits - 1)) - 1
    codes = np.clip(np.rint(rng.laplace(0, top / 6, (30, 40))), -top - 1, top).astype(np.int64)
    codes *= rng.random(codes.shape) < density
    codes.flat[:2] = [-top - 1, top] if density > 0 else [0, 0]  # the extremes
    enc = nna.encode_weights(codes, bits, formats=("huffman",))
    assert enc.format == "huffman"
    np.testing.assert_array_equal(nna.decode_weights(enc, codes.shape), codes)
    assert 8 * enc.nbytes == enc.payload_bits + enc.index_bits_total + enc.padding_bits
    assert enc.decoded_symbols == enc.entries * (2 if enc.index_bits else 1)
    best = nna.encode_weights(codes, bits, formats=nna.WEIGHT_FORMATS)
    assert best.nbytes == min(nna.encode_weights(codes, bits, formats=(f,)).nbytes for f in nna.WEIGHT_FORMATS)


def test_huffman_all_equal_and_empty_layers():
    for codes in (np.full((8, 9), 3), np.zeros((8, 9), np.int64), np.zeros((0, 5), np.int64)):
        enc = nna.encode_weights(codes, 4, formats=("huffman",))
        np.testing.assert_array_equal(nna.decode_weights(enc, codes.shape), codes)


def test_weight_formats_are_checked():
    with pytest.raises(ValueError, match="formats entry"):
        nna.encode_weights(np.zeros(4, np.int64), 4, formats=("zip",))
    with pytest.raises(ValueError, match="decode_symbols_per_cycle"):
        nna.NNAConfig(decode_symbols_per_cycle=0)
    assert "huffman" not in nna.SERIES2NX.sparse_formats  # the default stays fixed-width
    assert nna.SERIES2NX_HUFFMAN.sparse_formats == nna.WEIGHT_FORMATS


# ----------------------------------------------------------------------------- real programs
@pytest.fixture(scope="module")
def tiny_data():
    return nnlab.data.load_data(train_limit=256, test_limit=200, verbose=False)


@pytest.fixture(scope="module")
def pruned_program(tiny_data):
    net = nnlab.cache.pretrained("lenet5", data=tiny_data, quick=True, verbose=False)
    q = nnlab.quant.quantise_model(nnlab.prune.core_by_fraction(net, 0.93), tiny_data, 4, 8)
    return nna.compile_model(q, name="lenet5-sparse")


def test_huffman_program_save_load_is_exact_and_sized_as_reported(pruned_program, tiny_data, tmp_path):
    prog, cfg = pruned_program, nna.SERIES2NX_HUFFMAN
    table = nna.report(prog, cfg)
    assert any(f.startswith("huffman") for f in table["format"])
    info = nna.save(prog, tmp_path / "p.nna", cfg)
    header, header_bytes = nna.read_header(tmp_path / "p.nna")
    assert os.path.getsize(tmp_path / "p.nna") == info["file_bytes"] == header_bytes + int(table.iloc[-1]["storage_B"])
    assert info["storage_bytes"] == sum(nna.storage.encode_layer(l, cfg).nbytes + nna.storage.parameter_bytes(l)
                                        for l in prog.weight_layers)
    loaded = nna.load(tmp_path / "p.nna")
    assert loaded == prog
    for a, b in zip(loaded.weight_layers, prog.weight_layers):
        np.testing.assert_array_equal(a.weight, b.weight)
    images = np.concatenate([x.numpy() for x, _ in tiny_data.test])[:64]
    np.testing.assert_array_equal(nna.run(loaded, images).logits, nna.run(prog, images).logits)


def test_huffman_files_carry_format_4_and_others_stay_format_3(pruned_program, tmp_path):
    """An nnlab that predates Huffman coding refuses a file holding it (format 4) and still reads the others."""
    nna.save(pruned_program, tmp_path / "h.nna", nna.SERIES2NX_HUFFMAN)
    nna.save(pruned_program, tmp_path / "p.nna")
    assert (tmp_path / "h.nna").read_bytes()[:4] == b"NNA4"
    assert (tmp_path / "p.nna").read_bytes()[:4] == b"NNA3"
    assert nna.load(tmp_path / "p.nna") == pruned_program
    data = bytearray((tmp_path / "h.nna").read_bytes())
    data[3:4] = b"3"  # a format-3 file claiming Huffman layers: refused, even with a valid checksum
    rest = bytes(data[36:])
    (tmp_path / "bad.nna").write_bytes(b"NNA3" + hashlib.sha256(rest).digest() + rest)
    with pytest.raises(nna.storage.ProgramFileError, match="format 3 cannot hold Huffman-coded layers"):
        nna.load(tmp_path / "bad.nna")


def test_huffman_is_smaller_than_sparse_packing_on_a_pruned_lenet(pruned_program):
    packed, coded = nna.report(pruned_program), nna.report(pruned_program, nna.SERIES2NX_HUFFMAN)
    weights = lambda t: t.iloc[-1][["payload_B", "index_B", "padding_B"]].sum()  # noqa: E731
    assert weights(coded) < 0.9 * weights(packed)
    assert nna.summary(coded)["compression"] > nna.summary(packed)["compression"]


def test_huffman_decoding_costs_time_and_energy(pruned_program):
    cfg = nna.SERIES2NX_HUFFMAN
    packed, coded = nna.report(pruned_program), nna.report(pruned_program, cfg)
    assert (packed["decode_symbols"] == 0).all() and (packed["energy_decode_nJ"] == 0).all()
    layers = coded.iloc[:-1]
    huffman = layers["format"].str.startswith("huffman")
    assert (layers.loc[huffman, "decode_symbols"] > 0).all() and (layers.loc[~huffman, "decode_symbols"] == 0).all()
    np.testing.assert_allclose(layers["cycles_decode"], layers["decode_symbols"] / cfg.decode_symbols_per_cycle)
    np.testing.assert_allclose(layers["energy_decode_nJ"], layers["decode_symbols"] * cfg.energy.decode_symbol / 1000)
    np.testing.assert_allclose(layers["cycles"], layers[["cycles_compute", "cycles_memory"]].max(axis=1)
                               + layers["cycles_decode"])
    np.testing.assert_allclose(layers["energy_nJ"], layers[["energy_mac_nJ", "energy_sram_nJ", "energy_dram_nJ",
                                                            "energy_decode_nJ"]].sum(axis=1))
    faster = nna.report(pruned_program, cfg.replace(decode_symbols_per_cycle=4))
    assert faster.iloc[-1]["cycles_decode"] == pytest.approx(coded.iloc[-1]["cycles_decode"] / 4)
    assert faster.iloc[-1]["latency_us"] < coded.iloc[-1]["latency_us"]
