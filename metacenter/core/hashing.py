"""Prompt block hashes as the gateway computes them, in pure Python.

``prompt_hashes(prompt)[i]`` is MurmurHash3 x64-128 (seed 0, first 64 bits,
unsigned) of the prompt's bytes up to the end of 512-byte chunk ``i``; the
last, partial chunk counts. So hash ``i`` identifies the whole prefix and two
prompts that share a prefix share its leading hashes.

MurmurHash3 consumes 16-byte blocks and only the tail and the length enter the
finalisation, so the block state after a prefix is the state every longer
prefix starts from: all the hashes of a prompt cost one pass over it, not one
pass per prefix.
"""

import struct

BLOCK_SIZE = 512

_MASK64 = (1 << 64) - 1
_C1 = 0x87C37B91114253D5
_C2 = 0x4CF5AD432745937F


def _fmix64(k):
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _MASK64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _MASK64
    k ^= k >> 33
    return k


def _absorb(words, start, stop, h1, h2):
    """Mix the 16-byte blocks ``words[start:stop:2]`` (pairs of little-endian
    uint64) into the state."""
    m = _MASK64
    c1, c2 = _C1, _C2
    for i in range(start, stop, 2):
        k1 = (words[i] * c1) & m
        k1 = ((k1 << 31) | (k1 >> 33)) & m
        h1 ^= (k1 * c2) & m
        h1 = ((h1 << 27) | (h1 >> 37)) & m
        h1 = (((h1 + h2) * 5) + 0x52DCE729) & m

        k2 = (words[i + 1] * c2) & m
        k2 = ((k2 << 33) | (k2 >> 31)) & m
        h2 ^= (k2 * c1) & m
        h2 = ((h2 << 31) | (h2 >> 33)) & m
        h2 = (((h2 + h1) * 5) + 0x38495AB5) & m
    return h1, h2


def _finish(h1, h2, tail, length):
    """The first 64 bits of the digest of a message whose full blocks left the
    state (h1, h2), followed by ``tail`` (under 16 bytes), ``length`` in all."""
    m = _MASK64
    if len(tail) > 8:
        k2 = int.from_bytes(tail[8:], "little")
        k2 = (k2 * _C2) & m
        k2 = ((k2 << 33) | (k2 >> 31)) & m
        h2 ^= (k2 * _C1) & m
    if tail:
        k1 = int.from_bytes(tail[:8], "little")
        k1 = (k1 * _C1) & m
        k1 = ((k1 << 31) | (k1 >> 33)) & m
        h1 ^= (k1 * _C2) & m
    h1 ^= length
    h2 ^= length
    h1 = (h1 + h2) & m
    h2 = (h2 + h1) & m
    h1 = _fmix64(h1)
    h2 = _fmix64(h2)
    return (h1 + h2) & m


def murmur3_64(data: bytes, seed: int = 0) -> int:
    """MurmurHash3 x64-128 of ``data`` (bytes-like), first 64 bits as an
    unsigned int (as mmh3's ``hash64(data, seed, signed=False)[0]``): the gateway's
    block hash (docs/cache.md)."""
    data = bytes(data)
    full = len(data) & ~15
    words = struct.unpack_from(f"<{full // 8}Q", data)
    seed &= _MASK64
    h1, h2 = _absorb(words, 0, len(words), seed, seed)
    return _finish(h1, h2, data[full:], len(data))


def prompt_hashes(prompt: bytes, block_size: int = BLOCK_SIZE) -> list[int]:
    """The running hash at the end of every ``block_size``-byte chunk of
    ``prompt`` (bytes-like), the last partial chunk included; [] for b"".
    These are the ``prompt_hash`` values of ``/v1/cache/*``. TypeError for a
    str (encode it first), ValueError for a block_size that is not a
    positive integer."""
    if isinstance(prompt, str):
        raise TypeError("prompt must be bytes (encode the text first), got str")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    data = bytes(prompt)
    words = struct.unpack_from(f"<{(len(data) & ~15) // 8}Q", data)
    h1 = h2 = 0
    absorbed = 0  # bytes already mixed into (h1, h2): always a multiple of 16
    hashes = []
    for end in range(block_size, len(data) + block_size, block_size):
        end = min(end, len(data))
        full = end & ~15
        h1, h2 = _absorb(words, absorbed // 8, full // 8, h1, h2)
        absorbed = full
        hashes.append(_finish(h1, h2, data[full:end], end))
    return hashes
