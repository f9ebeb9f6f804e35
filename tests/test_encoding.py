import numpy as np
import pytest

from backend.pipeline.encoding import Encoding, EncodingFormatError


def _encoding() -> Encoding:
    rng = np.random.default_rng(0)
    return Encoding(
        features=rng.normal(size=(20, 8, 8)).astype(np.float16),
        image_embedding=rng.normal(size=16).astype(np.float32),
        caption="a dog on a sofa, «quoted» ünïcode",
        width=640,
        height=427,
        fingerprint="abc123",
    )


def test_round_trip_is_exact():
    original = _encoding()
    copy = Encoding.from_bytes(original.to_bytes())
    np.testing.assert_array_equal(copy.features, original.features)
    assert copy.features.dtype == np.float16
    np.testing.assert_array_equal(copy.image_embedding, original.image_embedding)
    assert (copy.caption, copy.width, copy.height, copy.fingerprint) == ("a dog on a sofa, «quoted» ünïcode", 640, 427, "abc123")


def test_bytes_are_not_a_pickle():
    data = _encoding().to_bytes()
    assert not data.startswith(b"\x80")  # pickle protocol 2+ marker
    assert b'"format":"1"' in data[: 8 + int.from_bytes(data[:8], "little")]


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 7, b"\xff" * 64, b"\x80\x04\x95pickle"])
def test_garbage_is_a_format_error(garbage):
    with pytest.raises(EncodingFormatError):
        Encoding.from_bytes(garbage)


def test_truncated_bytes_are_a_format_error():
    data = _encoding().to_bytes()
    with pytest.raises(EncodingFormatError):
        Encoding.from_bytes(data[: len(data) // 2])


def test_other_format_version_is_refused():
    data = _encoding().to_bytes().replace(b'"format":"1"', b'"format":"9"')
    with pytest.raises(EncodingFormatError, match="format"):
        Encoding.from_bytes(data)
