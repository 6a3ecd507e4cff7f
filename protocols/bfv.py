"""BFV vector sums with TenSEAL for wide aggregates (DESIGN.md protocol 3).

Wide vectors (histograms, cross-tabs) of 64-bit words are summed under the analyst's BFV key
(Brakerski 2012; Fan-Vercauteren 2012, via Microsoft SEAL in TenSEAL). Only *sums of fresh
encryptions* are ever formed: no ciphertext-plaintext or ciphertext-ciphertext multiplication,
no rotations (DESIGN.md protocol 5).

Parameters: polynomial degree 8192 (4096 and 16384 allowed) with SEAL's default coefficient
modulus, which is the largest allowed for 128-bit classical security by the Homomorphic
Encryption Standard (Albrecht et al., 2018, Table 1: 109, 218, 438 bits for 4096, 8192, 16384);
SEAL refuses anything weaker and :meth:`BfvPublicContext.from_bytes` re-checks it. The plaintext
modulus :data:`PLAIN_MODULUS` is a 50-bit prime congruent to 1 modulo 2*16384, so batching works
at every allowed degree. Each u64 word travels as two 32-bit limbs in two slots; after summing
``S <= MAX_SUMMANDS`` contributions each limb total is below ``S * (2^32 - 1) < PLAIN_MODULUS``,
so nothing wraps modulo the plaintext modulus and the analyst recombines the limbs into the
exact sum modulo 2^64 (the ring of the pairwise masks, ``govshare.protocols.masks``). A vector
longer than one ciphertext (slot_count / 2 words) is cut into chunks.

Who learns what (semi-honest; RLWE hardness at 128-bit security):

- The **analyst** creates the context and keeps the secret key; only the public context (public
  key, no secret, relinearisation or Galois keys) leaves it. It learns the decrypted sums.
- **Nodes** and the **aggregator** learn nothing about the encrypted vectors. The aggregator
  learns how many contributions it adds and the vector length. The noise of a sum of fresh
  encryptions is the sum of independent fresh noises, so the sum ciphertext carries no
  information about individual summands beyond their sum.
- A chunk's framing (index, count, length, number of summands) is public and unauthenticated;
  the transport's signatures and mTLS protect it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, Final

import tenseal as ts
import tenseal.sealapi  # registers seal::Modulus with pybind11, read by _check_context

from govshare.protocols.errors import MalformedInput

__all__ = [
    "ALLOWED_POLY_MODULUS_DEGREES",
    "LIMB_BITS",
    "MAX_SUMMANDS",
    "PLAIN_MODULUS",
    "POLY_MODULUS_DEGREE",
    "BfvPublicContext",
    "BfvSecretContext",
]

POLY_MODULUS_DEGREE: Final = 8192
# HE Standard (homomorphicencryption.org, 2018), Table 1, 128-bit classical security,
# uniform ternary secret: the largest log2(q) per degree.
_MAX_COEFF_MODULUS_BITS: Final = {4096: 109, 8192: 218, 16384: 438}
ALLOWED_POLY_MODULUS_DEGREES: Final = tuple(sorted(_MAX_COEFF_MODULUS_BITS))
# Prime, = 1 (mod 32768) so batching works for every allowed degree, < 2^50 (tests check it).
PLAIN_MODULUS: Final = 1125899904679937
LIMB_BITS: Final = 32
_LIMBS: Final = 2
_LIMB_MASK: Final = (1 << LIMB_BITS) - 1
# Limb totals must stay below the plaintext modulus.
MAX_SUMMANDS: Final = (PLAIN_MODULUS - 1) // _LIMB_MASK
# 16 Mi words: bounds the work a received header can ask for.
_MAX_VECTOR_LENGTH: Final = 1 << 24
_U64: Final = 1 << 64

_CONTEXT_MAGIC: Final = b"GSBC"
_CHUNK_MAGIC: Final = b"GSBV"
_VERSION: Final = 1
_CONTEXT_HEADER: Final = struct.Struct(">4sB")
# magic, version, chunk index, chunk count, vector length (words), summands
_CHUNK_HEADER: Final = struct.Struct(">4sBIIII")
# What TenSEAL/SEAL raise on bad streams.
_TENSEAL_ERRORS: Final = (ValueError, RuntimeError, TypeError)


def _params(context: Any) -> Any:
    return context.seal_context().data.key_context_data().parms()


def _chunk_count(length: int, per_chunk: int) -> int:
    return max(1, -(-length // per_chunk))


class BfvPublicContext:
    """A node's view: the analyst's public BFV context. Encrypts and adds, cannot decrypt."""

    __slots__ = ("_context", "poly_modulus_degree")

    def __init__(self, context: Any) -> None:
        self._context = context
        self.poly_modulus_degree: int = int(_params(context).poly_modulus_degree())

    @property
    def slot_count(self) -> int:
        return self.poly_modulus_degree

    @property
    def words_per_chunk(self) -> int:
        """u64 words per ciphertext (two limbs per word)."""
        return self.slot_count // _LIMBS

    @classmethod
    def from_bytes(cls, data: bytes) -> BfvPublicContext:
        """Parse the analyst's public context strictly.

        Raises:
            MalformedInput: bad framing or stream, a context holding a secret key, or parameters
                other than govshare's (scheme, degree, plaintext modulus, security).
        """
        if not isinstance(data, bytes):
            raise TypeError("context encoding must be bytes")
        try:
            magic, version = _CONTEXT_HEADER.unpack_from(data)
        except struct.error as exc:
            raise MalformedInput("BFV context is truncated", field="context") from exc
        if magic != _CONTEXT_MAGIC or version != _VERSION:
            raise MalformedInput("not a govshare BFV context", field="context")
        try:
            context = ts.context_from(data[_CONTEXT_HEADER.size :])
        except _TENSEAL_ERRORS as exc:
            raise MalformedInput("BFV context does not parse", field="context") from exc
        _check_context(context)
        if context.has_secret_key() or not context.is_public():
            raise MalformedInput("BFV context carries a secret key", field="context")
        if not context.has_public_key():
            raise MalformedInput("BFV context has no public key", field="context")
        return cls(context)

    # -- encryption and sums -------------------------------------------------------------------

    def encrypt(self, values: Sequence[int]) -> list[bytes]:
        """Encrypt a vector of u64 words (``[0, 2^64)``; see ``masks.to_u64`` for signed values).

        Returns one framed ciphertext per chunk of :attr:`words_per_chunk` words.

        Raises:
            MalformedInput: empty, too long, or a value outside ``[0, 2^64)``.
        """
        length = len(values)
        if not 1 <= length <= _MAX_VECTOR_LENGTH:
            raise MalformedInput(
                f"vector length must be in [1, {_MAX_VECTOR_LENGTH}]", field="values"
            )
        for value in values:
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError("values must be ints")
            if not 0 <= value < _U64:
                raise MalformedInput("values must be in [0, 2^64)", field="values")
        per = self.words_per_chunk
        count = _chunk_count(length, per)
        chunks = []
        for index in range(count):
            limbs: list[int] = []
            for value in values[index * per : (index + 1) * per]:
                limbs.append(value & _LIMB_MASK)
                limbs.append(value >> LIMB_BITS)
            vector = ts.bfv_vector(self._context, limbs)
            chunks.append(_frame(index, count, length, 1, vector))
        return chunks

    def sum(self, contributions: Sequence[Sequence[bytes]]) -> list[bytes]:
        """Add several parties' encrypted vectors chunk by chunk (the aggregator's step).

        Args:
            contributions: each the list of framed chunks of one party (fresh from
                :meth:`encrypt`, or earlier partial sums).

        Raises:
            MalformedInput: no contributions, inconsistent lengths, bad chunks, or more than
                :data:`MAX_SUMMANDS` summands in total.
        """
        if not contributions:
            raise MalformedInput("no contributions to add", field="contributions")
        parsed = [self._parse_all(chunks) for chunks in contributions]
        length = parsed[0][0]
        if any(p[0] != length for p in parsed):
            raise MalformedInput("contributions differ in length", field="contributions")
        summands = sum(p[1] for p in parsed)
        if summands > MAX_SUMMANDS:
            raise MalformedInput(f"more than {MAX_SUMMANDS} summands", field="contributions")
        vectors = [p[2] for p in parsed]
        count = len(vectors[0])
        out = []
        for index in range(count):
            total = vectors[0][index]
            for other in vectors[1:]:
                total = total + other[index]
            out.append(_frame(index, count, length, summands, total))
        return out

    # -- parsing -------------------------------------------------------------------------------

    def _parse_all(self, chunks: Sequence[bytes]) -> tuple[int, int, list[Any]]:
        """Parse one party's chunks: (vector length, summands, tenseal vectors in order)."""
        if not chunks:
            raise MalformedInput("no chunks", field="chunks")
        vectors: list[Any] = []
        length = summands = 0
        for position, data in enumerate(chunks):
            index, count, this_length, this_summands, vector = self._parse_chunk(data)
            if position == 0:
                length, summands = this_length, this_summands
                if count != len(chunks):
                    raise MalformedInput("chunk count does not match", field="chunks")
            elif (this_length, this_summands) != (length, summands):
                raise MalformedInput("chunks of one vector disagree", field="chunks")
            if index != position:
                raise MalformedInput("chunks out of order", field="chunks")
            vectors.append(vector)
        return length, summands, vectors

    def _parse_chunk(self, data: bytes) -> tuple[int, int, int, int, Any]:
        if not isinstance(data, bytes):
            raise TypeError("chunks must be bytes")
        try:
            magic, version, index, count, length, summands = _CHUNK_HEADER.unpack_from(data)
        except struct.error as exc:
            raise MalformedInput("BFV chunk is truncated", field="chunk") from exc
        if magic != _CHUNK_MAGIC or version != _VERSION:
            raise MalformedInput("not a govshare BFV chunk", field="chunk")
        if not 1 <= length <= _MAX_VECTOR_LENGTH:
            raise MalformedInput("vector length out of bounds", field="chunk")
        per = self.words_per_chunk
        if count != _chunk_count(length, per) or not index < count:
            raise MalformedInput("chunk index or count inconsistent", field="chunk")
        if not 1 <= summands <= MAX_SUMMANDS:
            raise MalformedInput("summand count out of bounds", field="chunk")
        try:
            vector = ts.bfv_vector_from(self._context, data[_CHUNK_HEADER.size :])
        except _TENSEAL_ERRORS as exc:
            raise MalformedInput("BFV ciphertext does not parse", field="chunk") from exc
        words = min(per, length - index * per)
        if vector.size() != _LIMBS * words:
            raise MalformedInput("BFV ciphertext has the wrong size", field="chunk")
        return index, count, length, summands, vector


class BfvSecretContext(BfvPublicContext):
    """The analyst's context: holds the secret key, decrypts sums."""

    __slots__ = ()

    @classmethod
    def create(cls, *, poly_modulus_degree: int = POLY_MODULUS_DEGREE) -> BfvSecretContext:
        """A fresh BFV keypair for one query (SEAL draws keys from the OS random source)."""
        if poly_modulus_degree not in ALLOWED_POLY_MODULUS_DEGREES:
            raise MalformedInput(
                f"polynomial degree must be one of {ALLOWED_POLY_MODULUS_DEGREES}",
                field="poly_modulus_degree",
            )
        context = ts.context(
            ts.SCHEME_TYPE.BFV,
            poly_modulus_degree=poly_modulus_degree,
            plain_modulus=PLAIN_MODULUS,
        )
        _check_context(context)
        return cls(context)

    def public_bytes(self) -> bytes:
        """The public context (public key only) framed for the wire. No secret key leaves."""
        body = self._context.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        return _CONTEXT_HEADER.pack(_CONTEXT_MAGIC, _VERSION) + bytes(body)

    def public_context(self) -> BfvPublicContext:
        """A public-only context, as a node would parse it."""
        return BfvPublicContext.from_bytes(self.public_bytes())

    def decrypt(self, chunks: Sequence[bytes]) -> list[int]:
        """Decrypt a (summed) vector: each word's total modulo 2^64.

        Raises:
            MalformedInput: bad chunks, or a limb total not below its bound (which would mean
                more summands than the framing says).
        """
        length, summands, vectors = self._parse_all(chunks)
        limb_bound = summands * _LIMB_MASK
        out: list[int] = []
        for vector in vectors:
            limbs = [int(x) % PLAIN_MODULUS for x in vector.decrypt()]
            for lo, hi in zip(limbs[0::2], limbs[1::2], strict=True):
                if lo > limb_bound or hi > limb_bound:
                    raise MalformedInput("limb total exceeds its bound", field="chunk")
                out.append((lo + (hi << LIMB_BITS)) % _U64)
        if len(out) != length:  # pragma: no cover - guaranteed by the chunk checks
            raise MalformedInput("decrypted length mismatch", field="chunks")
        return out


def _check_context(context: Any) -> None:
    params = _params(context)
    data = context.seal_context().data
    degree = int(params.poly_modulus_degree())
    if params.scheme().name != "BFV":
        raise MalformedInput("context is not BFV", field="context")
    if degree not in _MAX_COEFF_MODULUS_BITS:
        raise MalformedInput(f"polynomial degree {degree} not allowed", field="context")
    if int(params.plain_modulus().value()) != PLAIN_MODULUS:
        raise MalformedInput("unexpected plaintext modulus", field="context")
    bits = int(data.key_context_data().total_coeff_modulus_bit_count())
    if bits > _MAX_COEFF_MODULUS_BITS[degree]:
        raise MalformedInput("coefficient modulus too large for 128-bit security", field="context")
    if not data.parameters_set() or not data.key_context_data().qualifiers().using_batching:
        raise MalformedInput("BFV parameters are not valid for batching", field="context")


def _frame(index: int, count: int, length: int, summands: int, vector: Any) -> bytes:
    header = _CHUNK_HEADER.pack(_CHUNK_MAGIC, _VERSION, index, count, length, summands)
    return header + bytes(vector.serialize())
