"""Prefix-cache keys: a crafted collision of Python's built-in tuple hash must not share KV blocks."""

from __future__ import annotations

import random
import time

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BS = 16
M64 = 1 << 64
MOD = (1 << 61) - 1  # CPython hashes ints modulo this prime
P1, P2, P5 = 11400714785074694791, 14029467366897019727, 2870177450012600261  # tuplehash's xxHash primes


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) % M64


def _acc(lanes: list[int]) -> int:
    acc = P5
    for lane in lanes:
        acc = _rotl((acc + lane * P2) % M64, 31) * P1 % M64
    return acc


def _last_lane(prefix_lanes: list[int], target: int) -> int:
    """The hash the last item of a tuple needs for the tuple (``prefix_lanes`` + it) to hash to ``target``."""
    n = len(prefix_lanes) + 1
    acc = (target - (n ^ (P5 ^ 3527539))) % M64
    acc = _rotl(acc * pow(P1, -1, M64) % M64, 64 - 31)
    return (acc - _acc(prefix_lanes)) * pow(P2, -1, M64) % M64


def _int_with_hash(lane: int) -> int | None:
    """An int whose ``hash`` is ``lane`` (as unsigned 64 bits), if one exists."""
    signed = lane - M64 if lane >= 1 << 63 else lane
    if 0 <= signed < MOD or (-MOD < signed < 0 and signed != -1):
        return signed
    return None


def block_hashing_to(target: int, rng: random.Random) -> list[int]:
    """``BS`` tokens ``b`` with ``hash((None, tuple(b))) == target`` (CPython's tuple hash inverted)."""
    lane_b = _last_lane([hash(None) % M64], target)
    while True:
        tokens = [rng.randrange(3, 2048) for _ in range(BS - 1)]
        last = _int_with_hash(_last_lane([hash(t) % M64 for t in tokens], lane_b - M64 * (lane_b >= 1 << 63)))
        if last is not None:
            return tokens + [last]


def _seq(i: int, prompt: list[int]) -> Sequence:
    return Sequence(i, str(i), 0, prompt, SamplingParams(max_new_tokens=1), seed=i, stop_ids=frozenset())


def _prefill(bm: BlockManager, seq: Sequence) -> None:
    """What the engine does for a prompt: match the cached prefix, allocate, compute, publish the full blocks."""
    bm.match_prefix(seq)
    bm.grow(seq, seq.num_known_tokens)
    seq.num_computed_tokens = seq.num_known_tokens
    bm.register_full_blocks(seq)


def test_a_crafted_chain_hash_collision_does_not_share_a_block_computed_after_another_prefix():
    rng = random.Random(0)
    a = [rng.randrange(3, 2048) for _ in range(BS)]
    shared = [rng.randrange(3, 2048) for _ in range(BS)]
    p1 = hash((None, tuple(a)))
    p2 = p1 + MOD if p1 + MOD < 1 << 63 and p1 >= 0 else p1 - MOD  # hash(p2) == hash(p1), p2 != p1
    if p1 < 0:
        p2 = p1 + MOD if p1 + MOD < 0 else p1 - MOD
    b = block_hashing_to(p2, rng)
    assert a != b and hash((None, tuple(b))) == p2 and hash((p1, tuple(shared))) == hash((p2, tuple(shared)))

    bm = BlockManager(32, BS)
    _prefill(bm, _seq(0, b + [5]))  # caches the block b
    victim = _seq(1, a + shared + [5])  # caches `shared` as computed after a
    _prefill(bm, victim)
    attacker = _seq(2, b + shared + [5])
    bm.match_prefix(attacker)
    assert attacker.block_table[:1] != victim.block_table[:1], "b's own block"
    assert victim.block_table[1] not in attacker.block_table, "KV computed after a reused after b"
    assert len(attacker.block_table) == 1


def test_an_equal_prefix_still_shares_its_blocks_and_hashing_is_cheap():
    rng = random.Random(1)
    prompt = [rng.randrange(3, 2048) for _ in range(64 * BS)]
    bm = BlockManager(256, BS)
    first = _seq(0, prompt + [5])
    t0 = time.perf_counter()
    _prefill(bm, first)
    per_block = (time.perf_counter() - t0) / 64
    second = _seq(1, prompt + [6])
    bm.match_prefix(second)
    assert second.block_table == first.block_table[:64]
    print(f"publish: {per_block * 1e6:.1f} us per block of {BS} tokens")
    assert per_block < 200e-6
