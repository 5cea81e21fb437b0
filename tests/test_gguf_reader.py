"""dgemma's GGUF container reader against the gguf package's reader, on files written here with the package."""

import numpy as np
import pytest

from dgemma.quant.gguf_reader import GGUFReader

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType


def _write(path, alignment=None, endian=None) -> None:
    """A file with a value of every metadata type, arrays of several, and tensors of typed, bf16 and block types."""
    kwargs = {} if endian is None else {"endianess": endian}
    w = gguf.GGUFWriter(str(path), "diffusion_gemma", **kwargs)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1e-6)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -2**62)
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓ \x00 end")
    w.add_string("t.empty", "")
    w.add_array("t.strs", ["a", "", "▁piece", "日本", "<0x0A>"] * 50)
    w.add_array("t.ints", list(range(-5, 300)))
    w.add_array("t.floats", [0.5, -1.25, 3e38])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_array("t.no_items", [])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5, 7)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 9)).astype(np.float16))
    w.add_tensor("i32", rng.integers(-9, 9, (6,), dtype=np.int32))
    for name, qtype, rows, cols in [("bf16", Q.BF16, 4, 6), ("q8", Q.Q8_0, 3, 64), ("q4k", Q.Q4_K, 2, 512)]:
        weights, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (rows, cols // weights * size), dtype=np.uint8)
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_metadata_and_tensors_read_as_the_gguf_package_reads_them(tmp_path, alignment):
    path = tmp_path / "m.gguf"
    _write(path, alignment)
    ours, theirs = GGUFReader(path), gguf.GGUFReader(path)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]  # the package adds the header's counts as fields
    assert list(ours.fields) == keys
    for key in keys:
        if key == "t.nested":  # the package's `contents` flattens an array of arrays; checked below
            continue
        expected = theirs.fields[key].contents()
        assert ours.fields[key] == expected and type(ours.fields[key]) is type(expected), key
    assert ours.fields["t.nested"] == [[1, 2], [3]] and ours.fields["t.u64"] == 2**63 + 5
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors] == \
        ["f32", "f16", "i32", "bf16", "q8", "q4k"]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type and a.shape == tuple(b.shape.tolist()) and a.n_bytes == b.n_bytes
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data) and not a.data.flags.writeable, a.name


def _cut(path, n):
    path.write_bytes(path.read_bytes()[:n])


@pytest.mark.parametrize("fault, message", [
    ("not gguf", "no GGUF magic"),
    ("empty", "no GGUF magic"),
    ("version 1", "GGUF version 1 is not read; versions 2 and 3 are"),
    ("big-endian", "a big-endian file"),
    ("cut in the metadata", "cut short or garbled at byte"),
    ("cut in the tensor table", "cut short or garbled at byte"),
    ("cut in the data", "tensor 'q4k' runs past the end of the file"),
    ("repeated tensor name", "a tensor name is repeated"),
    ("bad value type", "unknown metadata value type 77"),
    ("partial block", "shape \\[100, 3\\] does not hold whole Q8_0 blocks of 32"),
    ("huge tensor", "tensor 'q8' runs past the end of the file"),
    ("zero alignment", "general.alignment is 0, not a positive integer"),
    ("deeply nested arrays", "metadata arrays nested more than 8 deep"),
])
def test_damaged_or_unsupported_files_are_refused_by_name(tmp_path, fault, message):
    path = tmp_path / "m.gguf"
    _write(path, alignment=64 if fault == "zero alignment" else None,
           endian=gguf.GGUFEndian.BIG if fault == "big-endian" else None)
    raw = bytearray(path.read_bytes())
    if fault == "not gguf":
        raw[:4] = b"GGUL"
    elif fault == "empty":
        raw = bytearray()
    elif fault == "version 1":
        raw[4:8] = (1).to_bytes(4, "little")
    elif fault == "cut in the metadata":
        raw = raw[:raw.index(b"t.floats") + 3]
    elif fault == "cut in the tensor table":
        raw = raw[:raw.index(b"q4k") + 5]
    elif fault == "cut in the data":
        raw = raw[:-10]
    elif fault == "repeated tensor name":
        at = raw.index(b"f16")
        raw[at:at + 3] = b"f32"
    elif fault == "bad value type":
        at = raw.index(b"t.u8") + 4  # the key, then its value type
        raw[at:at + 4] = (77).to_bytes(4, "little")
    elif fault == "partial block":
        at = raw.index(b"q8") + 2 + 4  # the name, the dimension count, then the row length
        raw[at:at + 8] = (100).to_bytes(8, "little")
    elif fault == "huge tensor":
        at = raw.index(b"q8") + 2 + 4
        raw[at:at + 16] = (2**63 - 32).to_bytes(8, "little") * 2  # rows x columns overflows 64 bits
    elif fault == "deeply nested arrays":  # t.nested, [[1, 2], [3]], becomes 100,000 one-array arrays around [1, 2]
        at = raw.index(b"t.nested") + len("t.nested") + 4  # the key, its value type, then: element type u32, count u64
        raw[at:at + 12] = ((9).to_bytes(4, "little") + (1).to_bytes(8, "little")) * 100_000
    elif fault == "zero alignment":
        at = raw.index(b"general.alignment") + len("general.alignment") + 4  # the key, then its value type u32
        raw[at:at + 4] = (0).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=message):
        GGUFReader(path)
