"""A test-only reference of SM2 signatures (GB/T 32918.2-2016 §6-7) over plain Python integers.

Why it exists: the binding govshare uses (tongsuopy, over Tongsuo) takes neither a custom curve
nor a custom distinguishing ID, so it cannot check the standard's own worked example
(GB/T 32918.2 Appendix A: a 256-bit *test* curve and the ID ``ALICE123@YAHOO.COM``). This module
checks that example, and a signature the binding makes on the recommended curve
(GB/T 32918.5) is verified here too, so the two implementations check each other.

Not constant-time, not validated beyond what the tests need, never imported by the package:
it lives in tests/ only. SM3 comes from ``cryptography`` (its own known answers are in
``tests/vectors/sm3.json``).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

Point = tuple[int, int] | None  # None is the point at infinity


@dataclass(frozen=True)
class Curve:
    """A short Weierstrass curve y² = x³ + ax + b over F_p with generator G of prime order n."""

    p: int
    a: int
    b: int
    gx: int
    gy: int
    n: int

    @property
    def g(self) -> Point:
        return (self.gx, self.gy)

    def on_curve(self, point: Point) -> bool:
        if point is None:
            return False
        x, y = point
        return (y * y - (x * x * x + self.a * x + self.b)) % self.p == 0

    def add(self, p1: Point, p2: Point) -> Point:
        if p1 is None:
            return p2
        if p2 is None:
            return p1
        x1, y1 = p1
        x2, y2 = p2
        if x1 == x2 and (y1 + y2) % self.p == 0:
            return None
        if p1 == p2:
            slope = (3 * x1 * x1 + self.a) * pow(2 * y1, -1, self.p) % self.p
        else:
            slope = (y2 - y1) * pow(x2 - x1, -1, self.p) % self.p
        x3 = (slope * slope - x1 - x2) % self.p
        return (x3, (slope * (x1 - x3) - y1) % self.p)

    def mul(self, k: int, point: Point) -> Point:
        result: Point = None
        addend = point
        while k:
            if k & 1:
                result = self.add(result, addend)
            addend = self.add(addend, addend)
            k >>= 1
        return result


def _int(hex_text: str) -> int:
    return int(hex_text.replace(" ", ""), 16)


# GB/T 32918.5-2017 (GM/T 0003.5-2012): the recommended 256-bit curve, "sm2p256v1".
RECOMMENDED = Curve(
    p=_int("FFFFFFFE FFFFFFFF FFFFFFFF FFFFFFFF FFFFFFFF 00000000 FFFFFFFF FFFFFFFF"),
    a=_int("FFFFFFFE FFFFFFFF FFFFFFFF FFFFFFFF FFFFFFFF 00000000 FFFFFFFF FFFFFFFC"),
    b=_int("28E9FA9E 9D9F5E34 4D5A9E4B CF6509A7 F39789F5 15AB8F92 DDBCBD41 4D940E93"),
    gx=_int("32C4AE2C 1F198119 5F990446 6A39C994 8FE30BBF F2660BE1 715A4589 334C74C7"),
    gy=_int("BC3736A2 F4F6779C 59BDCEE3 6B692153 D0A9877C C62A4740 02DF32E5 2139F0A0"),
    n=_int("FFFFFFFE FFFFFFFF FFFFFFFF FFFFFFFF 7203DF6B 21C6052B 53BBF409 39D54123"),
)


def curve_from_json(fields: dict[str, str]) -> Curve:
    """A curve from a vector file's ``curve`` object (hex strings p, a, b, gx, gy, n)."""
    return Curve(**{name: _int(fields[name]) for name in ("p", "a", "b", "gx", "gy", "n")})


def sm3(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SM3())
    digest.update(data)
    return digest.finalize()


def _coordinate(value: int, curve: Curve) -> bytes:
    return value.to_bytes((curve.p.bit_length() + 7) // 8, "big")


def z_value(curve: Curve, user_id: bytes, public: Point) -> bytes:
    """Z_A = SM3(ENTL_A ‖ ID_A ‖ a ‖ b ‖ x_G ‖ y_G ‖ x_A ‖ y_A) (GB/T 32918.2 §5.5)."""
    if public is None:
        raise ValueError("public key is the point at infinity")
    entl = (8 * len(user_id)).to_bytes(2, "big")
    parts = (curve.a, curve.b, curve.gx, curve.gy, public[0], public[1])
    return sm3(entl + user_id + b"".join(_coordinate(v, curve) for v in parts))


def message_digest(curve: Curve, user_id: bytes, public: Point, message: bytes) -> int:
    """e = SM3(Z_A ‖ M) as an integer (steps A1-A2 of signing, B3-B4 of verification)."""
    return int.from_bytes(sm3(z_value(curve, user_id, public) + message), "big")


def public_key(curve: Curve, d: int) -> Point:
    return curve.mul(d, curve.g)


def sign_with_k(curve: Curve, user_id: bytes, d: int, message: bytes, k: int) -> tuple[int, int]:
    """(r, s) with the caller's nonce ``k`` (steps A1-A7): for known answers only."""
    e = message_digest(curve, user_id, public_key(curve, d), message)
    point = curve.mul(k, curve.g)
    if point is None:
        raise ValueError("k·G is the point at infinity")
    r = (e + point[0]) % curve.n
    if r == 0 or r + k == curve.n:
        raise ValueError("bad k: r = 0 or r + k = n")
    s = pow(1 + d, -1, curve.n) * (k - r * d) % curve.n
    if s == 0:
        raise ValueError("bad k: s = 0")
    return r, s


def verify(
    curve: Curve, user_id: bytes, public: Point, message: bytes, signature: tuple[int, int]
) -> bool:
    """Steps B1-B7 of GB/T 32918.2 §7."""
    r, s = signature
    if not (1 <= r < curve.n and 1 <= s < curve.n) or not curve.on_curve(public):
        return False
    e = message_digest(curve, user_id, public, message)
    t = (r + s) % curve.n
    if t == 0:
        return False
    point = curve.add(curve.mul(s, curve.g), curve.mul(t, public))
    if point is None:
        return False
    return (e + point[0]) % curve.n == r
