"""Join-key normalisers, chosen by a ``join_key`` column's ``key_type``.

Two departments only match a person if they spell the key identically, so every join key goes
through its type's normaliser when a dataset is imported (and again when a key is typed in by
hand): the normaliser returns the canonical spelling or raises :class:`MalformedInput` saying
which rule failed. A key that cannot be normalised is refused rather than silently never
matching.

Key types:

- ``resident_id``: an 18-character PRC resident identity number (GB 11643-1999), upper-case
  ``X``, check character and date of birth verified; delegated to
  :func:`govshare.node.data.resident_id.normalise`.
- ``text``: Unicode NFKC, case-folded, NFKC again (the Unicode standard's "compatibility
  caseless" form, so full-width and case variants match), surrounding whitespace stripped;
  empty text and control characters are refused.

More types are added with :func:`register` (a module-level registry, filled at import).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from govshare.node.data import resident_id
from govshare.protocols.errors import MalformedInput

Normaliser = Callable[[str], str]

RESIDENT_ID = "resident_id"
TEXT = "text"

# Text keys longer than this are not identifiers (and would bloat every PSI item).
MAX_TEXT_KEY_CHARS = 256
_KEY_TYPE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_REGISTRY: dict[str, Normaliser] = {}


def normalise_text(raw: str) -> str:
    """NFKC, case-fold, NFKC, strip. Raises MalformedInput for empty or control characters."""
    if not isinstance(raw, str):
        raise TypeError("a key must be a str")
    value = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", raw).casefold()).strip()
    if not value:
        raise MalformedInput("text key is empty", field=TEXT)
    if _CONTROL.search(value):
        raise MalformedInput("text key holds a control character", field=TEXT)
    if len(value) > MAX_TEXT_KEY_CHARS:
        raise MalformedInput(f"text key is longer than {MAX_TEXT_KEY_CHARS} characters", field=TEXT)
    return value


def register(key_type: str, function: Normaliser) -> None:
    """Add a key type. Raises TypeError for a malformed or already registered name."""
    if not _KEY_TYPE.match(key_type):
        raise TypeError(f"key type {key_type!r} must match {_KEY_TYPE.pattern}")
    if key_type in _REGISTRY:
        raise TypeError(f"key type {key_type!r} is already registered")
    _REGISTRY[key_type] = function


def key_types() -> tuple[str, ...]:
    """The registered key types, sorted."""
    return tuple(sorted(_REGISTRY))


def normaliser(key_type: str) -> Normaliser:
    """The normaliser of ``key_type``.

    Raises:
        MalformedInput: no such key type (the message lists the known ones).
    """
    try:
        return _REGISTRY[key_type]
    except KeyError:
        raise MalformedInput(
            f"unknown key type {key_type!r}; known: {', '.join(key_types())}", field="key_type"
        ) from None


def normalise(key_type: str, raw: str) -> str:
    """Normalise one key. Raises MalformedInput for an unknown type or an invalid key."""
    return normaliser(key_type)(raw)


register(RESIDENT_ID, resident_id.normalise)
register(TEXT, normalise_text)
