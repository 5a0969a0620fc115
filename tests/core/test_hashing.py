"""Prompt block hashes against the contract's known answer and, independently,
against the mmh3 C extension on every cumulative prefix."""

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metacenter.core.hashing import BLOCK_SIZE, murmur3_64, prompt_hashes


def reference_hash(data):
    # mmh3 5.x ignores a positional `signed` and returns signed values.
    return mmh3.hash64(data, 0, True, signed=False)[0]


def reference_prompt_hashes(prompt, block_size=BLOCK_SIZE):
    ends = range(block_size, len(prompt) + block_size, block_size)
    return [reference_hash(prompt[: min(end, len(prompt))]) for end in ends]


def test_known_answer_from_the_contract():
    prompt = bytes((7 * i) % 256 for i in range(1200))
    assert prompt_hashes(prompt) == [4269816323887316428, 4738464904102037223, 8673195530823563900]


def test_known_answer_agrees_with_mmh3():
    prompt = bytes((7 * i) % 256 for i in range(1200))
    assert prompt_hashes(prompt) == reference_prompt_hashes(prompt)


@pytest.mark.parametrize("length", range(0, 49))
def test_single_hash_every_tail_length(length):
    # 0..48 bytes covers empty input, every tail length 1..15 with and
    # without full blocks before it, and exact block multiples.
    data = bytes((31 * i + 5) % 256 for i in range(length))
    assert murmur3_64(data) == reference_hash(data)


def test_values_span_the_unsigned_range():
    hashes = [murmur3_64(bytes([i])) for i in range(64)]
    assert all(0 <= h < 2**64 for h in hashes)
    assert any(h >= 2**63 for h in hashes)


@pytest.mark.parametrize("length", [1, 511, 512, 513, 1023, 1024, 1025, 5000])
def test_chunk_boundaries(length):
    prompt = bytes((13 * i + 1) % 256 for i in range(length))
    hashes = prompt_hashes(prompt)
    assert len(hashes) == -(-length // BLOCK_SIZE)
    assert hashes == reference_prompt_hashes(prompt)


def test_empty_prompt_has_no_hashes():
    assert prompt_hashes(b"") == []


def test_shared_prefix_gives_shared_leading_hashes():
    common = bytes(range(256)) * 4  # exactly two chunks
    a = prompt_hashes(common + b"first ending")
    b = prompt_hashes(common + b"a different ending")
    assert a[:2] == b[:2]
    assert a[2] != b[2]


def test_accepts_bytes_like_inputs():
    data = bytes(range(200)) * 6
    assert prompt_hashes(bytearray(data)) == prompt_hashes(memoryview(data)) == prompt_hashes(data)


def test_rejects_text_and_bad_block_sizes():
    with pytest.raises(TypeError):
        prompt_hashes("text is not bytes")
    for bad in (0, -512, 1.5, True):
        with pytest.raises(ValueError):
            prompt_hashes(b"abc", block_size=bad)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=3000), st.sampled_from([1, 7, 16, 100, 512, 1000]))
def test_every_prefix_matches_mmh3(prompt, block_size):
    assert prompt_hashes(prompt, block_size) == reference_prompt_hashes(prompt, block_size)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=2**32 - 1))
def test_seeded_hash_matches_mmh3(data, seed):
    # Seeds are 32-bit in mmh3 and in the Go package the gateway uses.
    assert murmur3_64(data, seed) == mmh3.hash64(data, seed, True, signed=False)[0]
