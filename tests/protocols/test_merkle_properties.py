"""Properties of govshare.protocols.merkle over random trees.

- Every generated inclusion/consistency proof verifies.
- Flipping any single bit of a proof hash or a root makes verification fail.
- Flipping a bit of an index or a size fails *unless* the flipped value gives the same proof shape
  (then the verifier cannot tell them apart, which the module docstring states: the size is
  authenticated by the signed checkpoint, not by the proof). The shape is computed here from the
  recursive definitions of RFC 9162 §2.1.3.1/§2.1.4.1, independently of the verifier's bit tricks,
  so the property is two-sided: same shape must verify, different shape must fail.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from govshare.protocols.errors import MalformedInput, VerificationFailed
from govshare.protocols.merkle import (
    MAX_TREE_SIZE,
    CompactRange,
    consistency_proof,
    consistency_proof_from_subtrees,
    inclusion_proof,
    inclusion_proof_from_subtrees,
    leaf_hash,
    node_hash,
    root_hash,
    subtree_hash_from_complete,
    verify_consistency,
    verify_inclusion,
)

MAX_LEAVES = 70  # covers several levels and every small odd/even shape; keeps the suite fast


def _flip(value: bytes, bit: int) -> bytes:
    data = bytearray(value)
    data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def _reference_root(leaves: list[bytes]) -> bytes:
    """MTH by RFC 6962's recursive definition, for cross-checking the iterative one."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(_reference_root(leaves[:k]), _reference_root(leaves[k:]))


def _inclusion_shape(index: int, size: int) -> list[bool] | None:
    """Bottom-up: is each sibling on the left? None when index is outside the tree."""
    if not 0 <= index < size:
        return None
    shape: list[bool] = []
    while size > 1:
        k = 1 << ((size - 1).bit_length() - 1)
        if index < k:
            shape.append(False)
            size = k
        else:
            shape.append(True)
            index -= k
            size -= k
    return shape[::-1]


def _consistency_shape(size1: int, size2: int) -> tuple[bool, list[bool]] | None:
    """(old root implicit?, bottom-up sibling-on-left flags) from SUBPROOF; None if no proof."""
    if not 0 < size1 < size2:
        return None
    shape: list[bool] = []
    m, n, whole = size1, size2, True
    while m != n:
        k = 1 << ((n - 1).bit_length() - 1)
        if m <= k:
            shape.append(False)
            n = k
        else:
            shape.append(True)
            m -= k
            n -= k
            whole = False
    return whole, shape[::-1]


trees = st.lists(st.binary(max_size=8), min_size=1, max_size=MAX_LEAVES, unique=True).map(
    lambda items: [leaf_hash(item) for item in items]
)


@st.composite
def tree_and_index(draw: st.DrawFn) -> tuple[list[bytes], int]:
    leaves = draw(trees)
    return leaves, draw(st.integers(0, len(leaves) - 1))


@st.composite
def tree_and_old_size(draw: st.DrawFn) -> tuple[list[bytes], int]:
    leaves = draw(trees.filter(lambda t: len(t) >= 2))
    return leaves, draw(st.integers(1, len(leaves) - 1))


@given(trees)
def test_iterative_root_matches_recursive_definition(leaves: list[bytes]) -> None:
    assert root_hash(leaves) == _reference_root(leaves)


@given(trees)
def test_compact_range_tracks_root_and_persists_every_complete_subtree(
    leaves: list[bytes],
) -> None:
    complete: dict[tuple[int, int], bytes] = {}
    edge = CompactRange()
    for position, leaf in enumerate(leaves):
        complete[(0, position)] = leaf
        for level, index, value in edge.append(leaf):
            complete[(level, index)] = value
        assert edge.root() == root_hash(leaves[: position + 1])
    # Resuming from stored edge hashes gives the same state.
    resumed = CompactRange(len(leaves), [complete[p] for p in CompactRange.positions(len(leaves))])
    assert resumed.root() == edge.root()
    assert resumed.hashes == edge.hashes

    def from_store(start: int, end: int) -> bytes:
        return subtree_hash_from_complete(start, end, lambda lv, ix: complete[(lv, ix)])

    size = len(leaves)
    for index in range(size):
        assert inclusion_proof_from_subtrees(index, size, from_store) == inclusion_proof(
            index, leaves
        )
    for old in range(1, size):
        assert consistency_proof_from_subtrees(old, size, from_store) == consistency_proof(
            old, leaves
        )


@given(tree_and_index())
def test_every_inclusion_proof_verifies(case: tuple[list[bytes], int]) -> None:
    leaves, index = case
    proof = inclusion_proof(index, leaves)
    assert len(proof) == len(_inclusion_shape(index, len(leaves)) or [])
    verify_inclusion(index, len(leaves), leaves[index], proof, root_hash(leaves))


@given(tree_and_old_size())
def test_every_consistency_proof_verifies(case: tuple[list[bytes], int]) -> None:
    leaves, old = case
    proof = consistency_proof(old, leaves)
    verify_consistency(old, len(leaves), proof, root_hash(leaves[:old]), root_hash(leaves))


@settings(max_examples=200)
@given(tree_and_index(), st.data())
def test_inclusion_bit_flips(case: tuple[list[bytes], int], data: st.DataObject) -> None:
    leaves, index = case
    size = len(leaves)
    proof = inclusion_proof(index, leaves)
    root = root_hash(leaves)
    leaf = leaves[index]
    target = data.draw(st.sampled_from(["proof", "root", "leaf", "index", "size"]))
    if target == "proof" and not proof:
        target = "root"  # a one-leaf tree has an empty proof
    if target == "proof":
        which = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        bad = list(proof)
        bad[which] = _flip(bad[which], bit)
        _must_fail(lambda: verify_inclusion(index, size, leaf, bad, root))
    elif target == "root":
        bad_root = _flip(root, data.draw(st.integers(0, 255)))
        _must_fail(lambda: verify_inclusion(index, size, leaf, proof, bad_root))
    elif target == "leaf":
        bad_leaf = _flip(leaf, data.draw(st.integers(0, 255)))
        _must_fail(lambda: verify_inclusion(index, size, bad_leaf, proof, root))
    else:
        bit = data.draw(st.integers(0, 63))
        new_index = index ^ (1 << bit) if target == "index" else index
        new_size = size ^ (1 << bit) if target == "size" else size
        same_shape = _inclusion_shape(new_index, new_size) == _inclusion_shape(index, size)
        if same_shape:
            verify_inclusion(new_index, new_size, leaf, proof, root)
        else:
            _must_fail(lambda: verify_inclusion(new_index, new_size, leaf, proof, root))


@settings(max_examples=200)
@given(tree_and_old_size(), st.data())
def test_consistency_bit_flips(case: tuple[list[bytes], int], data: st.DataObject) -> None:
    leaves, old = case
    size = len(leaves)
    proof = consistency_proof(old, leaves)
    root1, root2 = root_hash(leaves[:old]), root_hash(leaves)
    target = data.draw(st.sampled_from(["proof", "root1", "root2", "size1", "size2"]))
    if target == "proof":
        which = data.draw(st.integers(0, len(proof) - 1))
        bad = list(proof)
        bad[which] = _flip(bad[which], data.draw(st.integers(0, 255)))
        _must_fail(lambda: verify_consistency(old, size, bad, root1, root2))
    elif target == "root1":
        bad_root = _flip(root1, data.draw(st.integers(0, 255)))
        _must_fail(lambda: verify_consistency(old, size, proof, bad_root, root2))
    elif target == "root2":
        bad_root = _flip(root2, data.draw(st.integers(0, 255)))
        _must_fail(lambda: verify_consistency(old, size, proof, root1, bad_root))
    else:
        bit = data.draw(st.integers(0, 63))
        size1 = old ^ (1 << bit) if target == "size1" else old
        size2 = size ^ (1 << bit) if target == "size2" else size
        if _consistency_shape(size1, size2) == _consistency_shape(old, size):
            verify_consistency(size1, size2, proof, root1, root2)
        else:
            _must_fail(lambda: verify_consistency(size1, size2, proof, root1, root2))


def test_same_shape_is_a_real_case() -> None:
    """The exception in the size property is not hypothetical: sizes 5 and 7, index 0."""
    leaves = [leaf_hash(bytes([i])) for i in range(5)]
    proof = inclusion_proof(0, leaves)
    verify_inclusion(0, 7, leaves[0], proof, root_hash(leaves))
    assert _inclusion_shape(0, 5) == _inclusion_shape(0, 7)


def test_sizes_beyond_uint64_are_malformed() -> None:
    leaf = leaf_hash(b"x")
    for bad in (-1, MAX_TREE_SIZE):
        try:
            verify_inclusion(0, bad, leaf, [], leaf)
        except MalformedInput:
            continue
        raise AssertionError(f"size {bad} accepted")


def _must_fail(check: Callable[[], None]) -> None:
    try:
        check()
    except (VerificationFailed, MalformedInput):
        return
    raise AssertionError("verification unexpectedly succeeded")
