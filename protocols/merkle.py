"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and proof verification over ``hashlib``.

Spec: RFC 9162 (Certificate Transparency 2.0) §2.1, which restates RFC 6962 §2.1.

- Leaf hash: ``SHA-256(0x00 || data)``; interior node: ``SHA-256(0x01 || left || right)``; the
  empty tree's root is ``SHA-256("")``. The 0x00/0x01 prefixes separate the two domains, so no
  interior node can be passed off as a leaf (second-preimage resistance of the tree).
- The tree over ``n`` leaves splits at ``k``, the largest power of two smaller than ``n``.

What a proof proves (and what it does not):

- :func:`verify_inclusion` proves that a leaf hash sits at ``index`` in *the* tree whose root is
  ``root``, given that ``root`` is the root of a tree of ``size`` leaves. The proof itself does not
  authenticate ``size``: a few other sizes share the same proof shape (index 0 in trees of 5 and 7
  leaves, for example) and verify the same way. The pair (size, root) must come from one signed
  checkpoint, never from two sources.
- :func:`verify_consistency` proves that the tree with root ``root1`` over ``size1`` leaves is a
  prefix of the tree with root ``root2`` over ``size2`` leaves: the log only appended. It says
  nothing about the content of the appended leaves.
- Both rely only on SHA-256 collision resistance; neither reveals anything beyond the ``log2(n)``
  sibling hashes in the proof.

Consistency from size 0. These verifiers follow RFC 9162 §2.1.4.2 as implemented by
transparency-dev/merkle and its vectors (``../shared/vectors/merkle/consistency/additional``): a
consistency check from size 0 is meaningless and *always* fails, even 0 -> 0.
The witness path (C2SP tlog-witness, where a first contact sends old size 0 with an empty proof)
uses the separately named :func:`verify_witness_consistency`, which accepts exactly that case and
otherwise defers to :func:`verify_consistency`.

Equal sizes. When ``size1 == size2`` the check is "proof empty and ``root1 == root2``" with the
roots compared as opaque byte strings, as in transparency-dev/merkle; the vector
``sizes-are-equal-one-and-proof-is-empty`` (12-byte roots, must verify) pins that. Everywhere a
hash enters a computation its length is checked, and a wrong length raises
:class:`MalformedInput`.

Proof generation works from a list of leaf hashes, or from a ``subtree_hash(start, end)`` callback
so that a store holding the hashes of complete aligned subtrees (see :class:`CompactRange` and
:func:`subtree_hash_from_complete`) answers proofs for a large log without rescanning it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Final

from govshare.protocols.errors import MalformedInput, VerificationFailed
from govshare.protocols.suite import Suite

HASH_SIZE = 32  # SHA-256 digest size, RFC 9162 §2.1.1
MAX_TREE_SIZE = 2**64  # tree sizes and indices are uint64 (RFC 9162 §4.1 TreeHeadDataV2)

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_sha256 = hashlib.sha256

SubtreeHash = Callable[[int, int], bytes]
"""``subtree_hash(start, end)`` returns MTH(D[start:end]), the RFC 6962 hash of leaves
``start..end-1``. Proof generation only asks for ranges whose start is a multiple of the largest
power of two not exceeding ``end - start``, i.e. ranges made of complete aligned subtrees."""

CompleteSubtreeHash = Callable[[int, int], bytes]
"""``complete(level, index)`` returns the hash of the complete subtree over leaves
``index * 2**level .. (index + 1) * 2**level - 1`` (level 0 is the leaf hash)."""


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


# --- proof generation -------------------------------------------------------------------------


def inclusion_proof_from_subtrees(index: int, size: int, subtree_hash: SubtreeHash) -> list[bytes]:
    """Return PATH(index, D[size]) (RFC 9162 §2.1.3.1), leaf-side sibling first.

    Raises:
        MalformedInput: ``index`` is not in ``[0, size)``.
    """
    _check_size(size, "size")
    _check_size(index, "index")
    if index >= size:
        raise MalformedInput(f"index {index} is outside a tree of {size} leaves", field="index")
    proof: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            proof.append(subtree_hash(start + k, end))
            end = start + k
        else:
            proof.append(subtree_hash(start, start + k))
            start += k
    proof.reverse()
    return proof


def consistency_proof_from_subtrees(
    old_size: int, new_size: int, subtree_hash: SubtreeHash
) -> list[bytes]:
    """Return PROOF(old_size, D[new_size]) (RFC 9162 §2.1.4.1), bottom-up.

    The proof is empty when ``old_size == new_size`` and, per C2SP tlog-witness, when
    ``old_size == 0`` (verify that one with :func:`verify_witness_consistency`).

    Raises:
        MalformedInput: ``old_size > new_size``.
    """
    _check_size(old_size, "old_size")
    _check_size(new_size, "new_size")
    if old_size > new_size:
        raise MalformedInput(f"old size {old_size} exceeds new size {new_size}", field="old_size")
    if old_size in (0, new_size):
        return []
    proof: list[bytes] = []
    start, end, m = 0, new_size, old_size
    whole_old_tree = True  # SUBPROOF's flag b: the node MTH(D[0:old_size]) is known to the verifier
    while True:
        n = end - start
        if m == n:
            if not whole_old_tree:
                proof.append(subtree_hash(start, end))
            break
        k = _split(n)
        if m <= k:
            proof.append(subtree_hash(start + k, end))
            end = start + k
        else:
            proof.append(subtree_hash(start, start + k))
            start += k
            m -= k
            whole_old_tree = False
    proof.reverse()
    return proof


class TreeHasher:
    """RFC 9162's tree over one hash function (SHA-256 in the RFC; the SM suite's SM3).

    The structure — prefixes, splits, proofs — is the RFC's whatever the hash; only the digest
    changes. Use :data:`SHA256_TREE` or :func:`tree_hasher`; the module-level functions are
    :data:`SHA256_TREE`'s (what the RFC's and C2SP's vectors check).
    """

    __slots__ = ("_h", "empty_root", "name")

    def __init__(self, name: str, digest: Callable[[bytes], bytes]) -> None:
        self.name = name
        self._h = digest
        self.empty_root = digest(b"")
        if len(self.empty_root) != HASH_SIZE:
            raise TypeError(f"a Merkle hash is {HASH_SIZE} bytes")

    def compact_range(self, size: int = 0, hashes: Sequence[bytes] = ()) -> CompactRange:
        """A :class:`CompactRange` of this tree's hash."""
        return CompactRange(size, hashes, tree=self)

    def leaf_hash(self, data: bytes) -> bytes:
        """Return the RFC 6962 leaf hash ``SHA-256(0x00 || data)``."""
        return self._h(_LEAF_PREFIX + data)

    def node_hash(self, left: bytes, right: bytes) -> bytes:
        """Return the RFC 6962 interior node hash ``SHA-256(0x01 || left || right)``.

        Raises:
            MalformedInput: ``left`` or ``right`` is not a 32-byte hash.
        """
        _check_hash(left, "left")
        _check_hash(right, "right")
        return self._h(_NODE_PREFIX + left + right)

    def root_hash(self, leaf_hashes: Sequence[bytes]) -> bytes:
        """Return MTH(D[n]), the root of the tree over ``leaf_hashes`` (``self.empty_root`` when
        empty).

        Bottom-up and iterative: each level pairs neighbours and promotes an unpaired last node,
        which builds exactly RFC 6962's tree (the split at the largest power of two below ``n``).

        Raises:
            MalformedInput: a leaf hash is not 32 bytes.
        """
        for position, value in enumerate(leaf_hashes):
            if not isinstance(value, bytes) or len(value) != HASH_SIZE:
                raise MalformedInput(f"leaf hash {position} is not {HASH_SIZE} bytes", field="leaf")
        return self._root_unchecked(leaf_hashes)

    def _root_unchecked(self, leaf_hashes: Sequence[bytes]) -> bytes:
        if not leaf_hashes:
            return self.empty_root
        level = list(leaf_hashes)
        prefix = _NODE_PREFIX
        while len(level) > 1:
            paired = [
                self._h(prefix + level[i] + level[i + 1]) for i in range(0, len(level) - 1, 2)
            ]
            if len(level) % 2:
                paired.append(level[-1])
            level = paired
        return level[0]

    def _list_subtree_hash(self, leaf_hashes: Sequence[bytes]) -> SubtreeHash:
        def subtree(start: int, end: int) -> bytes:
            return self._root_unchecked(leaf_hashes[start:end])

        return subtree

    def inclusion_proof(self, index: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
        """Inclusion proof for leaf ``index`` in the tree over all of ``leaf_hashes``."""
        self.root_hash(leaf_hashes)  # validates every hash once
        return inclusion_proof_from_subtrees(
            index, len(leaf_hashes), self._list_subtree_hash(leaf_hashes)
        )

    def consistency_proof(self, old_size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
        """Consistency proof from the first ``old_size`` leaves to all of ``leaf_hashes``."""
        self.root_hash(leaf_hashes)
        return consistency_proof_from_subtrees(
            old_size, len(leaf_hashes), self._list_subtree_hash(leaf_hashes)
        )

    def subtree_hash_from_complete(
        self, start: int, end: int, complete: CompleteSubtreeHash
    ) -> bytes:
        """MTH(D[start:end]) from the hashes of complete aligned subtrees.

        ``[start, end)`` splits into blocks of the sizes of the binary digits of ``end - start``,
        largest first; RFC 6962's tree over the range is the right fold of those blocks. Each block
        must be aligned (its start a multiple of its size), which holds for every range proof
        generation asks for.

        Raises:
            MalformedInput: the range is empty or not made of aligned blocks.
        """
        if not 0 <= start < end:
            raise MalformedInput(f"empty or negative range [{start}, {end})", field="range")
        blocks: list[bytes] = []
        position = start
        width = end - start
        for level in range(width.bit_length() - 1, -1, -1):
            if width >> level & 1:
                if position % (1 << level):
                    raise MalformedInput(f"range [{start}, {end}) is not aligned", field="range")
                blocks.append(complete(level, position >> level))
                position += 1 << level
        result = blocks[-1]
        for block in reversed(blocks[:-1]):
            result = self._h(_NODE_PREFIX + block + result)
        return result

    def verify_inclusion(
        self, index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
    ) -> None:
        """Check that ``leaf`` is at ``index`` in the tree of ``size`` leaves with root ``root``.

        RFC 9162 §2.1.3.2. Returns ``None`` on success.

        Raises:
            VerificationFailed: the proof does not prove it (including ``index >= size``).
            MalformedInput: a hash is not 32 bytes, or an index/size is negative or beyond uint64.
            TypeError: an index/size is not an ``int``.
        """
        _check_size(index, "index")
        _check_size(size, "size")
        _check_hash(leaf, "leaf")
        _check_hash(root, "root")
        for value in proof:
            _check_hash(value, "proof")
        if index >= size:
            raise VerificationFailed()
        fn, sn = index, size - 1
        r = leaf
        for p in proof:
            if sn == 0:
                raise VerificationFailed()
            if fn & 1 or fn == sn:
                r = self._h(_NODE_PREFIX + p + r)
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
            else:
                r = self._h(_NODE_PREFIX + r + p)
            fn >>= 1
            sn >>= 1
        if sn != 0 or r != root:
            raise VerificationFailed()

    def verify_consistency(
        self, size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
    ) -> None:
        """Check that the tree (size1, root1) is a prefix of the tree (size2, root2).

        RFC 9162 §2.1.4.2, with the preconditions of transparency-dev/merkle: ``size1 > size2``
        fails; ``size1 == size2`` needs an empty proof and equal roots; ``size1 == 0`` always fails
        (see the module docstring; the witness rule is :func:`verify_witness_consistency`).

        Raises:
            VerificationFailed: the proof does not prove it.
            MalformedInput: a hash that enters the computation is not 32 bytes, or a size is
            negative
                or beyond uint64.
            TypeError: a size is not an ``int``.
        """
        _check_size(size1, "size1")
        _check_size(size2, "size2")
        if not isinstance(root1, bytes) or not isinstance(root2, bytes):
            raise TypeError("roots must be bytes")
        if size1 > size2:
            raise VerificationFailed()
        if size1 == size2:
            # Opaque comparison, see "Equal sizes" in the module docstring.
            if size1 == 0 or proof or root1 != root2:
                raise VerificationFailed()
            return
        if size1 == 0 or not proof:
            raise VerificationFailed()
        _check_hash(root1, "root1")
        _check_hash(root2, "root2")
        for value in proof:
            _check_hash(value, "proof")

        path = list(proof)
        if size1 & (size1 - 1) == 0:  # size1 is an exact power of two
            path.insert(0, root1)
        fn, sn = size1 - 1, size2 - 1
        while fn & 1:
            fn >>= 1
            sn >>= 1
        fr = sr = path[0]
        for c in path[1:]:
            if sn == 0:
                raise VerificationFailed()
            if fn & 1 or fn == sn:
                fr = self._h(_NODE_PREFIX + c + fr)
                sr = self._h(_NODE_PREFIX + c + sr)
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
            else:
                sr = self._h(_NODE_PREFIX + sr + c)
            fn >>= 1
            sn >>= 1
        if sn != 0 or fr != root1 or sr != root2:
            raise VerificationFailed()

    def verify_witness_consistency(
        self, old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes
    ) -> None:
        """Consistency as a C2SP tlog-witness checks it: old size 0 with an empty proof is accepted.

        A witness's first contact with a log has no previous checkpoint; every tree extends the
        empty tree, so the only check left is that the proof is empty and ``old_root`` is the empty
        tree's root (a size-0 checkpoint must carry ``SHA-256("")``). Everything else is
        :func:`verify_consistency`.

        Raises:
            VerificationFailed, MalformedInput, TypeError: as :func:`verify_consistency`.
        """
        _check_size(old_size, "old_size")
        _check_size(new_size, "new_size")
        if old_size != 0:
            self.verify_consistency(old_size, new_size, proof, old_root, new_root)
            return
        if proof or old_root != self.empty_root:
            raise VerificationFailed()
        _check_hash(new_root, "new_root")
        if new_size == 0 and new_root != self.empty_root:
            raise VerificationFailed()


class CompactRange:
    """The right edge of a growing Merkle tree: one complete-subtree hash per set bit of the size.

    Appending a leaf returns the complete subtrees it finished, so a store can persist every
    aligned subtree hash once and later answer proofs through :func:`subtree_hash_from_complete`.
    Memory is ``O(log n)``; appending is amortised one node hash per leaf.
    """

    __slots__ = ("_size", "_stack", "_tree")

    def __init__(
        self, size: int = 0, hashes: Sequence[bytes] = (), *, tree: TreeHasher | None = None
    ) -> None:
        """Resume at ``size`` with the hashes at :meth:`positions` ``(size)``, largest first.

        Raises:
            MalformedInput: the number or length of ``hashes`` does not fit ``size``.
        """
        _check_size(size, "size")
        positions = self.positions(size)
        if len(hashes) != len(positions):
            raise MalformedInput(
                f"a tree of {size} leaves needs {len(positions)} edge hashes, got {len(hashes)}",
                field="hashes",
            )
        for value in hashes:
            _check_hash(value, "hashes")
        self._tree = SHA256_TREE if tree is None else tree
        self._size = size
        self._stack = [(level, value) for (level, _), value in zip(positions, hashes, strict=True)]

    @staticmethod
    def positions(size: int) -> list[tuple[int, int]]:
        """``(level, index)`` of the complete subtrees forming ``[0, size)``, largest first."""
        return [
            (level, (size >> level) - 1)
            for level in range(size.bit_length() - 1, -1, -1)
            if size >> level & 1
        ]

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> list[bytes]:
        return [value for _, value in self._stack]

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Append one leaf hash; return the ``(level, index, hash)`` of subtrees it completed."""
        _check_hash(leaf, "leaf")
        return self._append_unchecked(leaf)

    def _append_unchecked(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        completed: list[tuple[int, int, bytes]] = []
        value, level, index = leaf, 0, self._size
        stack = self._stack
        digest = self._tree._h
        while stack and stack[-1][0] == level:
            _, left = stack.pop()
            value = digest(_NODE_PREFIX + left + value)
            level += 1
            index >>= 1
            completed.append((level, index, value))
        stack.append((level, value))
        self._size += 1
        return completed

    def root(self) -> bytes:
        """MTH of the whole range ``[0, size)``."""
        if not self._stack:
            return self._tree.empty_root
        result = self._stack[-1][1]
        for _, value in reversed(self._stack[:-1]):
            result = self._tree._h(_NODE_PREFIX + value + result)
        return result


# --- verification -----------------------------------------------------------------------------


def _sha256_digest(data: bytes) -> bytes:
    return _sha256(data).digest()


SHA256_TREE: Final = TreeHasher("SHA-256", _sha256_digest)
EMPTY_ROOT: Final = SHA256_TREE.empty_root

# RFC 9162 with SHA-256, as module functions (the vectors' and the standard suite's tree).
leaf_hash = SHA256_TREE.leaf_hash
node_hash = SHA256_TREE.node_hash
root_hash = SHA256_TREE.root_hash
inclusion_proof = SHA256_TREE.inclusion_proof
consistency_proof = SHA256_TREE.consistency_proof
subtree_hash_from_complete = SHA256_TREE.subtree_hash_from_complete
verify_inclusion = SHA256_TREE.verify_inclusion
verify_consistency = SHA256_TREE.verify_consistency
verify_witness_consistency = SHA256_TREE.verify_witness_consistency


def tree_hasher(suite: Suite) -> TreeHasher:
    """The RFC 9162 tree over ``suite``'s hash (SHA-256 for ``standard``, SM3 for ``sm``)."""
    if suite.hash_name == SHA256_TREE.name:
        return SHA256_TREE
    return _other_trees.setdefault(suite.name, TreeHasher(suite.hash_name, suite.hash))


_other_trees: dict[str, TreeHasher] = {}


# --- input checks -----------------------------------------------------------------------------


def _check_hash(value: object, field: str) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{field} must be bytes, not {type(value).__name__}")
    if len(value) != HASH_SIZE:
        raise MalformedInput(f"{field} is {len(value)} bytes, not {HASH_SIZE}", field=field)


def _check_size(value: object, field: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{field} must be an int, not {type(value).__name__}")
    if not 0 <= value < MAX_TREE_SIZE:
        raise MalformedInput(f"{field} {value} is outside [0, 2**64)", field=field)
