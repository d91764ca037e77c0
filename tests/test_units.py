import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkv.units import exact_size, format_bytes, parse_bytes, readable_size


@pytest.mark.parametrize(("text", "expected"), [
    ("8GiB", 8 << 30), ("512 MiB", 512 << 20), ("2GB", 2 * 10**9), ("1.5G", 1_500_000_000),
    ("1000000", 10**6), ("24gib", 24 << 30), ("3kb", 3000), ("1e9", 10**9), (" 4 TiB ", 4 << 40),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "8 GiBs", "-1GB", "eight", "8 G B", "0", "0.5"])
def test_parse_bytes_refuses_naming_the_argument(text):
    with pytest.raises(ValueError, match="--memory must be"):
        parse_bytes(text, "--memory")


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 bytes"), (999, "999 bytes"), (1000, "1 kB"), (12_345_678, "12.3 MB"),
    (1.5e9, "1.5 GB"), (999_999, "1 MB"), (2.5e18, "2,500 PB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@given(st.integers(min_value=1, max_value=10**15))
def test_format_then_parse_is_within_rounding(n):
    number, unit = format_bytes(n).split(" ")
    back = parse_bytes(number.replace(",", "") + ("" if unit == "bytes" else unit))
    assert abs(back - n) <= 0.005 * n + 1


@pytest.mark.parametrize("text", ["1e400GiB", "1e309", "9" * 400])
def test_parse_bytes_says_an_infinite_size_is_not_finite(text):
    with pytest.raises(ValueError, match=r"--memory must be a finite size, got"):
        parse_bytes(text, "--memory")


def test_readable_size():
    assert [readable_size(n) for n in (1, 1234, 8 << 30, 2000)] == [
        "1 byte", "1,234 bytes", "8GiB", "2kB"]


def test_exact_size_reads_back_exactly():
    for n in (8 << 30, 512 << 20, 2 * 10**9, 1536, 7, 1234):
        assert parse_bytes(exact_size(n)) == n
    assert exact_size(8 << 30) == "8GiB" and exact_size(2 * 10**9) == "2GB"
    assert exact_size(1234) == "1234"
