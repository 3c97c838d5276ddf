#!/usr/bin/env python3
"""safetensors_fixture.py: our safetensors files against Hugging Face's own library.

  python3 test/safetensors_fixture.py make test/fixtures/st_python.safetensors
      writes the sample (the same names and values as sample_fill in test_safetensors.cu)
      with the `safetensors` package; test_safetensors reads it back.
  python3 test/safetensors_fixture.py check FILE
      loads FILE, written by `build/test_safetensors --write-sample FILE`, with the
      `safetensors` package and compares every byte and the metadata.

Needs `pip install safetensors numpy` (not torch: BF16 is handled as raw 16-bit words).
CI does not run this; the fixture it makes is committed.
"""
import sys

import numpy as np
import safetensors

NOTE = "quote \" backslash \\ newline \n tab \t unicode \u00e9 \u2211 \U0001F600"
METADATA = {"format": "pt", "note": NOTE}


def bf16_bits(x):
    """float32 values that bf16 holds exactly -> their 16-bit patterns."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    assert np.all(bits & 0xFFFF == 0), "value not exact in bf16"
    return (bits >> 16).astype(np.uint16)


def sample():
    """name -> (safetensors dtype, numpy array holding the little-endian bytes)"""
    return {
        "f32": ("F32", ((np.arange(15) - 7) / 3.0).astype(np.float32).reshape(3, 5)),
        "bf16": ("BF16", bf16_bits((np.arange(8) - 3) * 0.375).reshape(2, 4)),
        "f16": ("F16", ((np.arange(4) - 2) * 0.625).astype(np.float16)),
        "i32": ("I32", (np.arange(6) * 1000 - 2500).astype(np.int32).reshape(2, 3)),
        "i64": ("I64", np.array([-(1 << 40), (1 << 40) + 5], dtype=np.int64)),
        "u8": ("U8", np.array([0, 128, 255], dtype=np.uint8)),
        "scalar": ("F32", np.array(42.5, dtype=np.float32)),
        "empty": ("F32", np.zeros((0, 4), dtype=np.float32)),
        'nested.name/with "quotes"': ("F64", np.array([0.1, -1e300], dtype=np.float64)),
    }


NUMPY_NAME = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I32": "int32",
              "I64": "int64", "U8": "uint8", "F64": "float64"}


def make(path):
    arrays = sample()
    specs = {name: safetensors.TensorSpec(dtype=NUMPY_NAME[dt], shape=list(a.shape),
                                          data_ptr=a.ctypes.data, data_len=a.nbytes)
             for name, (dt, a) in arrays.items()}
    safetensors.serialize_file(specs, path, metadata=METADATA)
    print("wrote %s (%d tensors)" % (path, len(specs)))


def check(path):
    data = open(path, "rb").read()
    header_len = int.from_bytes(data[:8], "little")
    assert (8 + header_len) % 8 == 0, "data region not 8-byte aligned"
    got = dict(safetensors.deserialize(data))  # the library's own validation
    want = sample()
    assert set(got) == set(want), "names differ: %s vs %s" % (sorted(got), sorted(want))
    for name, (dt, a) in want.items():
        g = got[name]
        assert g["dtype"] == dt, "%s: dtype %s, want %s" % (name, g["dtype"], dt)
        assert list(g["shape"]) == list(a.shape), "%s: shape %s, want %s" % (name, g["shape"], a.shape)
        assert bytes(g["data"]) == a.tobytes(), "%s: bytes differ" % name
    with safetensors.safe_open(path, framework="numpy") as f:
        assert f.metadata() == METADATA, "metadata differs: %r" % f.metadata()
        assert np.array_equal(f.get_tensor("f32"), want["f32"][1])
    print("ok: %s loads in the safetensors package (%d tensors, metadata, bytes)" % (path, len(got)))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("make", "check"):
        sys.exit(__doc__)
    (make if sys.argv[1] == "make" else check)(sys.argv[2])
