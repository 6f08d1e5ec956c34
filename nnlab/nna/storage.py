"""What the accelerator stores for a program, and a binary file that holds exactly that.

Per weight layer the memory holds:

* the weights, encoded by :func:`nnlab.nna.packing.encode_weights` in the
  smallest format the config allows (values, plus a mask or run-length index;
  or, where the config allows ``"huffman"``, Huffman-coded values and gaps,
  each after the code-length table the decoder rebuilds its code from);
* the parameters, per output channel: the int32 bias (4 bytes) and the
  float32 weight scale (4 bytes) from which the requantisation multiplier is
  derived; a model quantised by PyTorch also keeps its float32 bias (4 bytes),
  which PyTorch's kernels add in float.

:func:`save` writes a file whose size is the reported storage
(:func:`storage_bytes`) plus a small header; :func:`load` returns an
identical :class:`~nnlab.nna.program.Program`.

File layout (little-endian), format version 3 (magic ``b"NNA3"``), or 4
(``b"NNA4"``) when a layer's weights are Huffman-coded::

    4 bytes   magic b"NNA3" or b"NNA4"
    32 bytes  SHA-256 of everything after it (the length, the header and the body)
    4 bytes   uint32: length L of the JSON header
    L bytes   JSON header: program name and source, the packing, the table
              of activation grids (spec, scale, zero point), and for every
              layer its kind, the layers it reads, its grids (indices into
              the table; for weights the spec) and other fields (shapes,
              clamps, format, stream sizes)
    then, for each weight layer in order: its weight streams (mask or index,
              then values; Huffman: index table, index, values table,
              values), then int32 bias, float32 weight scales and, when
              present, float32 PyTorch bias.

So ``file size = header_bytes + storage_bytes``, with
``header_bytes = 40 + L`` (:func:`read_header` returns it).

Integrity: :func:`load` (and :func:`read_header`) check the SHA-256 before
reading anything else, so a damaged file (a flipped bit anywhere, a
truncated copy) is refused with one clear error
(:class:`ProgramFileError`) instead of loading a different network.  Files
of an older format (``b"NNA1"``: a list of layers with loose scale fields;
``b"NNA2"``: no checksum) or of a newer one are refused with a message
saying to compile and save the model again, and a header that does not
describe a program this version can build is named as such, never a raw
``KeyError``.  :func:`save` writes through a temporary file and a rename
(:func:`nnlab.base.atomic_write`: whole or not at all, with the user's
umask) and refuses a program holding non-finite numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from ..base import atomic_write
from ..quant.grid import Grid
from ..quant.spec import QuantSpec
from .config import SERIES2NX, WEIGHT_FORMATS, NNAConfig
from .packing import EncodedWeights, decode_weights, encode_weights
from .program import AddLayer, ConcatLayer, FlattenLayer, InputLayer, PoolLayer, Program, WeightLayer

__all__ = ["MAGIC", "FORMAT_VERSION", "ProgramFileError", "encode_layer", "parameter_bytes", "storage_bytes", "save",
           "load", "read_header"]

#: Version of the file format, in the magic number: 4 when a layer is Huffman-coded, else 3 (so that a file
#: without Huffman layers stays readable by an nnlab that predates them, and one with them is refused there).
FORMAT_VERSION = 4
MAGIC = b"NNA" + str(FORMAT_VERSION).encode()
#: The versions :func:`load` reads.
READS = (3, 4)
_MAGICS = tuple(b"NNA" + str(v).encode() for v in READS)
#: Bytes before the JSON header: magic, SHA-256, header length.
_PREFIX = 4 + 32 + 4
_KINDS = {"input": InputLayer, "weight": WeightLayer, "pool": PoolLayer, "flatten": FlattenLayer, "add": AddLayer,
          "concat": ConcatLayer}
_BODY = ("weight", "weight_grid", "bias", "bias_float")  # in the file's body, not in the JSON header


class ProgramFileError(ValueError):
    """A file that is not a sound saved program: foreign, damaged (checksum), truncated, or of another format."""


def encode_layer(layer: WeightLayer, config: NNAConfig = SERIES2NX) -> EncodedWeights:
    """A weight layer's weights as the accelerator stores them (smallest allowed format).

    Args:
        layer: a :class:`WeightLayer`.
        config: gives the packing and the allowed sparse formats; its
            ``min_bits..max_bits`` must include the layer's bit-depths.

    Returns:
        An :class:`~nnlab.nna.packing.EncodedWeights`.
    """
    config.check_bits(layer.weight_grid.bits, f"layer {layer.name!r} (weights)")
    config.check_bits(layer.in_grid.bits, f"layer {layer.name!r} (input activations)")
    return encode_weights(layer.weight, layer.weight_grid, config.sparse_formats, config.packing)


def parameter_bytes(layer: WeightLayer) -> int:
    """Bytes of a weight layer's parameters: 4 (int32 bias) + 4 (float32 scale) [+ 4 (float bias)] per channel."""
    per_channel = 8 + (4 if layer.bias_float is not None else 0)
    return per_channel * layer.out_channels


def storage_bytes(program: Program, config: NNAConfig = SERIES2NX) -> int:
    """Total bytes the accelerator stores for ``program``: encoded weights plus parameters."""
    return sum(encode_layer(l, config).nbytes + parameter_bytes(l) for l in program.weight_layers)


def _to_json(v, grids):
    """A layer field as JSON; a Grid becomes its index in the header's table of grids."""
    if isinstance(v, Grid):
        for i, g in enumerate(grids):
            if g == v:
                return i
        grids.append(v)
        return len(grids) - 1
    if isinstance(v, (tuple, list)):
        return [_to_json(x, grids) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def _layer_header(layer, encoded, grids):
    kind = next(k for k, cls in _KINDS.items() if type(layer) is cls)
    entry = {"kind": kind}
    for f in dataclasses.fields(layer):
        if f.name not in _BODY:
            entry[f.name] = _to_json(getattr(layer, f.name), grids)
    if kind == "weight":
        entry["weight_spec"] = layer.weight_grid.spec.to_dict()
        entry["weight_shape"] = list(layer.weight.shape)
        entry["has_bias_float"] = layer.bias_float is not None
        entry["encoding"] = {"format": encoded.format, "entries": encoded.entries, "index_bits": encoded.index_bits,
                             "streams": [[name, int(s.size)] for name, s in encoded.streams.items()]}
    return entry


def _from_json(name, value, grids):
    """A header field back to the layer's value: grids (by index), tuples of grids, tuples."""
    if name in ("grid", "in_grid", "out_grid"):
        return None if value is None else grids[value]
    if name == "in_grids":
        return tuple(grids[i] for i in value)
    if isinstance(value, list):
        return tuple(value)
    return value


def save(program: Program, path, config: NNAConfig = SERIES2NX) -> dict:
    """Write ``program`` to a binary file, weights packed as ``config`` stores them (atomically).

    Args:
        program: a compiled program.
        path: the file to write.
        config: packing and sparse formats (an integer config).

    Returns:
        dict with ``file_bytes``, ``header_bytes`` and ``storage_bytes``
        (``file_bytes == header_bytes + storage_bytes``).

    Raises:
        TypeError: ``program`` is not a Program or ``config`` not an NNAConfig.
        ValueError: an fp32 config, a layer whose bit-depths the config does
            not support, or a layer holding NaN or infinite values (named).
        OSError: the file cannot be written (nothing is left half-written).
    """
    if not isinstance(program, Program):
        raise TypeError(f"program must be a nnlab.nna Program, got {type(program).__name__}")
    if not isinstance(config, NNAConfig):
        raise TypeError(f"config must be an nnlab.nna.NNAConfig, got {type(config).__name__}")
    if config.arithmetic != "int":
        raise ValueError(f"config {config.name!r} computes in fp32; save a program with an integer config")
    _check_finite(program)
    body, headers, grids = [], [], []
    for layer in program.layers:
        encoded = encode_layer(layer, config) if isinstance(layer, WeightLayer) else None
        headers.append(_layer_header(layer, encoded, grids))
        if encoded is not None:
            body += [s.tobytes() for s in encoded.streams.values()]
            body += [layer.bias.astype("<i4").tobytes(), layer.weight_grid.scale.astype("<f4").tobytes()]
            if layer.bias_float is not None:
                body.append(layer.bias_float.astype("<f4").tobytes())
    header = json.dumps({"name": program.name, "source": program.source, "packing": config.packing,
                         "grids": [g.to_dict() for g in grids], "layers": headers}, separators=(",", ":")).encode()
    rest = len(header).to_bytes(4, "little") + header + b"".join(body)
    version = 4 if any(h.get("encoding", {}).get("format") == "huffman" for h in headers) else 3
    blob = b"NNA" + str(version).encode() + hashlib.sha256(rest).digest() + rest
    atomic_write(path, blob)
    header_bytes = _PREFIX + len(header)
    return {"file_bytes": len(blob), "header_bytes": header_bytes, "storage_bytes": len(blob) - header_bytes}


def _check_finite(program: Program) -> None:
    """Refuse a program holding NaN or infinite numbers (integers cannot; float biases and scales could)."""
    for layer in program.layers:
        activation = getattr(layer, "activation", None) or ()
        if any(v is not None and not np.isfinite(v) and not np.isinf(v) for v in activation):
            raise ValueError(f"layer {layer.name!r}: its activation clamp {activation} holds NaN")
        if not isinstance(layer, WeightLayer):
            continue
        arrays = {"weight": layer.weight, "bias": layer.bias, "weight scales": layer.weight_grid.scale}
        if layer.bias_float is not None:
            arrays["float bias"] = layer.bias_float
        for what, values in arrays.items():
            values = np.asarray(values)
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                bad = int(values.size - np.count_nonzero(np.isfinite(values)))
                raise ValueError(f"layer {layer.name!r}: its {what}: {bad} NaN or infinite value(s); a program must "
                                 f"hold finite numbers (check the model the program was compiled from)")
            if values.dtype.kind not in "iuf":
                raise ValueError(f"layer {layer.name!r}: its {what} must be numbers, got dtype {values.dtype}")


def read_header(path) -> tuple:
    """The JSON header of a saved program and its size in bytes (the checksum is verified first).

    Returns:
        ``(header dict, header_bytes)``.

    Raises:
        ProgramFileError: the file is not a sound saved NNA program of this format.
    """
    data = Path(path).read_bytes()
    return _parse_header(data, path)[:2]


def _parse_header(data, path):
    if not data:
        raise ProgramFileError(f"{path} is empty, not a saved NNA program")
    if len(data) < 4 and MAGIC.startswith(data):
        raise ProgramFileError(f"{path} is truncated ({len(data)} bytes)")
    reads = " and ".join(map(str, READS))
    if data[:3] == MAGIC[:3] and data[:4] not in _MAGICS:
        version = data[3:4].decode("ascii", errors="replace")
        if version.isdigit() and int(version) < min(READS):
            raise ProgramFileError(f"{path} is a saved NNA program of format {version}, which this nnlab does not "
                                   f"read (it reads formats {reads}); compile and save the model again")
        raise ProgramFileError(f"{path} is a saved NNA program of an unknown format {data[3:4]!r} (this nnlab reads "
                               f"formats {reads}): a newer nnlab wrote it, or the file is damaged")
    if data[:4] not in _MAGICS:
        raise ProgramFileError(f"{path} is not a saved NNA program (it does not start with b'NNA3' or b'NNA4')")
    if len(data) < _PREFIX:
        raise ProgramFileError(f"{path} is truncated ({len(data)} bytes, shorter than the {_PREFIX}-byte prefix)")
    if hashlib.sha256(data[36:]).digest() != data[4:36]:
        raise ProgramFileError(f"{path} is damaged: checksum mismatch (the SHA-256 of its {len(data) - 36} bytes "
                               f"after the checksum differs from the one saved); save the program again")
    n = int.from_bytes(data[36:40], "little")
    if _PREFIX + n > len(data):
        raise ProgramFileError(f"{path}: the header claims {n} bytes but the file has only {len(data) - _PREFIX}")
    try:
        header = json.loads(data[_PREFIX: _PREFIX + n].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProgramFileError(f"{path}: corrupt header ({exc})") from None
    if not isinstance(header, dict):
        raise ProgramFileError(f"{path}: unexpected header: a JSON {type(header).__name__}, not an object")
    missing = [k for k in ("name", "source", "packing", "grids", "layers") if k not in header]
    if missing:
        raise ProgramFileError(f"{path}: unexpected header: it lacks {', '.join(map(repr, missing))}")
    huffman = [e.get("name") for e in header["layers"] if isinstance(e, dict)
               and isinstance(e.get("encoding"), dict) and e["encoding"].get("format") == "huffman"]
    if huffman and data[:4] != b"NNA4":
        raise ProgramFileError(f"{path} is damaged: format {data[3:4].decode('ascii', 'replace')} cannot hold "
                               f"Huffman-coded layers, but layer {huffman[0]!r} is one (format 4 can)")
    return header, _PREFIX + n, data


def load(path) -> Program:
    """Read a program written by :func:`save`.

    Args:
        path: the file.

    Returns:
        The :class:`Program`, equal to the one saved.

    Raises:
        ProgramFileError (a ValueError): not a saved program, damaged
            (checksum mismatch), truncated, of another format version, or
            with a header this version cannot build a program from.
        OSError: the file cannot be read.
    """
    header, offset, data = _parse_header(Path(path).read_bytes(), path)
    try:
        return _build(header, offset, data, path)
    except ProgramFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        where = getattr(exc, "nnlab_where", "the header")
        text = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ProgramFileError(f"{path}: unexpected header ({where}: {text}); this nnlab cannot build a program "
                               f"from it") from None


def _build(header, offset, data, path):
    def take(n):
        nonlocal offset
        if offset + n > len(data):
            raise ProgramFileError(f"{path} is truncated")
        chunk = np.frombuffer(data, np.uint8, n, offset)
        offset += n
        return chunk

    grids = [Grid.from_dict(g) for g in header["grids"]]
    layers = []
    for i, entry in enumerate(header["layers"]):
        try:
            layers.append(_layer(dict(entry), grids, header["packing"], take))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            if not isinstance(exc, ProgramFileError):
                exc.nnlab_where = f"layer {i}" + (f" {entry.get('name')!r}" if isinstance(entry, dict) else "")
            raise
    if offset != len(data):
        raise ProgramFileError(f"{path} has {len(data) - offset} unexpected trailing bytes")
    return Program(layers, header["name"], header["source"])


def _layer(entry, grids, packing, take):
    kind = entry.pop("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown layer kind {kind!r} (known: {', '.join(_KINDS)})")
    cls = _KINDS[kind]
    fields = {f.name for f in dataclasses.fields(cls)}
    if cls is WeightLayer:
        enc_info, shape = entry.pop("encoding"), tuple(entry.pop("weight_shape"))
        if enc_info["format"] not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {enc_info['format']!r} (known: {', '.join(WEIGHT_FORMATS)})")
        has_bias_float = entry.pop("has_bias_float")
        spec = QuantSpec.from_dict(entry.pop("weight_spec"))
        streams = {name: take(size) for name, size in enc_info["streams"]}
        n_weights = int(np.prod(shape))
        enc = EncodedWeights(enc_info["format"], spec.bits, enc_info["index_bits"], n_weights,
                             enc_info["entries"], streams, 0, 0, 0)
        out = shape[0]
        entry["weight"] = decode_weights(enc, shape, packing)
        entry["bias"] = take(4 * out).view("<i4").astype(np.int32)
        scale = take(4 * out).view("<f4").astype(np.float32)
        entry["weight_grid"] = Grid(spec, scale, np.zeros(out, np.int64))
        entry["bias_float"] = take(4 * out).view("<f4").astype(np.float32) if has_bias_float else None
    kwargs = {k: (v if k in _BODY else _from_json(k, v, grids)) for k, v in entry.items() if k in fields}
    return cls(**kwargs)
