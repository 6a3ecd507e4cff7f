"""Masking rules for record-level release (脱敏).

A ``masked`` column, or a ``join_key`` column that carries a mask, is revealed only through its
masking rule. The rules are a small named set, written ``name`` or ``name:N``:

- ``keep_last:N`` — every character but the last N becomes ``*`` (a value no longer than N is
  masked whole, so the rule never reveals a short value entirely);
- ``keep_first:N`` — likewise, keeping the first N characters;
- ``hash_prefix`` — the first 16 hex digits of an HMAC under a caller-supplied key (HMAC-SHA256,
  or HMAC-SM3 on the ``sm`` suite).
  Keyed on purpose: an unkeyed hash of an 18-digit resident ID is brute-forced from the
  ~10^11 plausible IDs in minutes. Values masked under one key are linkable to each other
  (that is the point: a recipient can count repeats) and to nothing else. A node keys each
  column separately, from its own secret (``govshare.node.data.mask_key``);
- ``year_only`` — a date ``YYYY-MM-DD``, ``YYYY/MM/DD`` or ``YYYYMMDD`` becomes ``YYYY``;
- ``redact`` — the value becomes ``***`` whatever it was.

:func:`parse_mask` validates a rule when a dataset is registered; :func:`apply_mask` applies it
at release time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from govshare.protocols.errors import MalformedInput
from govshare.protocols.suite import Suite

KEEP_LAST = "keep_last"
KEEP_FIRST = "keep_first"
HASH_PREFIX = "hash_prefix"
YEAR_ONLY = "year_only"
REDACT = "redact"

# Rules taking a count N, and rules taking none.
_COUNTED = frozenset({KEEP_LAST, KEEP_FIRST})
_PLAIN = frozenset({HASH_PREFIX, YEAR_ONLY, REDACT})
MASK_NAMES: tuple[str, ...] = (KEEP_LAST, KEEP_FIRST, HASH_PREFIX, YEAR_ONLY, REDACT)

# keep_last / keep_first keep at most this many characters: enough for the "last four digits"
# convention, few enough that an 18-character ID keeps most of itself hidden.
MAX_KEPT = 6
# hash_prefix keeps 64 bits of the HMAC: collisions stay negligible for tables of 10^7 rows
# (birthday bound ~ 2^-18) while the released label stays short.
HASH_PREFIX_HEX = 16
# The hash_prefix key must carry at least 128 bits.
MIN_HASH_KEY_BYTES = 16
REDACTED = "***"
MASK_CHAR = "*"

_RULE = re.compile(r"^([a-z_]+)(?::([0-9]{1,3}))?$")
_DATE = re.compile(r"^([0-9]{4})(?:-[0-9]{2}-[0-9]{2}|/[0-9]{2}/[0-9]{2}|[0-9]{4})$")


@dataclass(frozen=True)
class MaskRule:
    """A parsed masking rule; ``str(rule)`` gives back its canonical text."""

    name: str
    count: int | None = None

    def __str__(self) -> str:
        return self.name if self.count is None else f"{self.name}:{self.count}"


def parse_mask(text: str) -> MaskRule:
    """Parse and validate a rule such as ``keep_last:4`` or ``redact``.

    Raises:
        MalformedInput: unknown rule name, missing or out-of-range count, or a count given
            to a rule that takes none.
    """
    match = _RULE.match(text.strip())
    if match is None or match.group(1) not in MASK_NAMES:
        raise MalformedInput(
            f"unknown masking rule {text!r}; known: keep_last:N, keep_first:N, "
            "hash_prefix, year_only, redact",
            field="mask",
        )
    name, count_text = match.group(1), match.group(2)
    if name in _COUNTED:
        if count_text is None:
            raise MalformedInput(f"masking rule {name} needs a count, e.g. {name}:4", field="mask")
        count = int(count_text)
        if not 1 <= count <= MAX_KEPT:
            raise MalformedInput(
                f"masking rule {name}:{count} must keep between 1 and {MAX_KEPT} characters",
                field="mask",
            )
        return MaskRule(name, count)
    if count_text is not None:
        raise MalformedInput(f"masking rule {name} takes no count", field="mask")
    return MaskRule(name)


def needs_key(rule: str | MaskRule) -> bool:
    """True if :func:`apply_mask` needs ``key`` for ``rule`` (``hash_prefix``).

    Raises:
        MalformedInput: the rule is unknown.
    """
    parsed = rule if isinstance(rule, MaskRule) else parse_mask(rule)
    return parsed.name == HASH_PREFIX


def apply_mask(rule: str | MaskRule, value: str, *, suite: Suite, key: bytes | None = None) -> str:
    """Return ``value`` as the masking rule lets it be released.

    Args:
        rule: a rule text or a parsed :class:`MaskRule`.
        value: the stored value (already normalised, for a join key).
        key: the HMAC key for ``hash_prefix`` (at least 16 bytes); ignored by other rules.

    Raises:
        MalformedInput: the rule is unknown, or ``year_only`` meets a value that is not a date.
        TypeError: ``hash_prefix`` without a key of at least 16 bytes.
    """
    parsed = rule if isinstance(rule, MaskRule) else parse_mask(rule)
    if parsed.name == REDACT:
        return REDACTED
    if parsed.name in _COUNTED:
        kept = parsed.count or 0
        if len(value) <= kept:
            return MASK_CHAR * len(value)
        hidden = len(value) - kept
        if parsed.name == KEEP_LAST:
            return MASK_CHAR * hidden + value[hidden:]
        return value[:kept] + MASK_CHAR * hidden
    if parsed.name == YEAR_ONLY:
        match = _DATE.match(value.strip())
        if match is None:
            raise MalformedInput("year_only masks dates written YYYY-MM-DD or YYYYMMDD")
        return match.group(1)
    # hash_prefix
    if key is None or len(key) < MIN_HASH_KEY_BYTES:
        raise TypeError(f"hash_prefix needs a key of at least {MIN_HASH_KEY_BYTES} bytes")
    digest = suite.mac(key, value.encode("utf-8")).hex()
    return digest[:HASH_PREFIX_HEX]
