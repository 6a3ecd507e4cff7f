"""A department's data file as the catalogue reads it: its encoding, delimiter and headers.

Files exported by department systems are often not UTF-8 but GBK (Windows code page 936) or
GB18030 (GB 18030-2022, its superset that covers all of Unicode), with Chinese headers, and
separated by tabs or semicolons as often as by commas. A file is read in two passes:

1. :func:`scan` reads its bytes once for their SHA-256 (the ``source_sha256`` the audit log
   records) and its encoding. A named encoding is checked over the whole file. Without one the
   candidates of :data:`DETECTED` are tried in turn and the first that decodes every byte is
   used: UTF-8 first (a leading byte-order mark allowed), because GBK text is almost never valid
   UTF-8 — a GBK lead byte (0x81-0xFE) is followed by an ASCII byte or by another lead byte
   where UTF-8 wants a continuation byte — while UTF-8 text often decodes, wrongly, as GBK;
   then GBK; then GB18030, which also decodes its four-byte sequences. A file that no candidate
   decodes is refused with the line of its first bad byte, and so is a file whose lines are
   UTF-8 with non-ASCII text up to a line that is not (two encodings in one file, which GBK
   would "decode" into the wrong characters).
2. :func:`read` streams the rows with their row and line numbers, the header renamed through
   the operator's header map, and checks that the bytes it read are the bytes :func:`scan`
   hashed (a file rewritten in between is refused, so the logged digest is of what was
   imported).

Every encoding accepted here keeps ASCII as itself and never uses the byte 0x0A inside a
multi-byte character, so lines can be counted on the raw bytes and a CSV parser can run on the
decoded text. Errors never quote a cell or a byte of the file: either may be personal data.
Header names are quoted: they are column titles, not data.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from govshare.protocols.errors import MalformedInput, NotFound

# Encodings an operator may name (``--encoding``), by Python's canonical codec name. Each is an
# ASCII superset without 0x0A inside a multi-byte character (see the module docstring); GB2312
# files are valid GBK, Big5 is what Hong Kong and Taiwan departments export.
ENCODINGS = ("utf-8", "gbk", "gb18030", "gb2312", "big5", "big5hkscs")
# Tried in this order when no encoding is named.
DETECTED = ("utf-8", "gbk", "gb18030")
# Delimiters a file may use: comma, tab, semicolon, vertical bar.
DELIMITERS = (",", "\t", ";", "|")
# Bytes read at a time while scanning and between two progress reports.
CHUNK_BYTES = 1 << 20

# Called with (phase, bytes done, bytes in the file); phases are "scanning" and "importing".
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SourceFormat:
    """How to read a file: ``encoding`` (``None``: detect), ``delimiter``, and the header map,
    ``(header in the file, column name)`` pairs renaming headers to the rules' column names."""

    encoding: str | None = None
    delimiter: str = ","
    header_map: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "encoding": self.encoding,
            "delimiter": self.delimiter,
            "header_map": [list(pair) for pair in self.header_map],
        }

    @classmethod
    def from_json(cls, raw: object) -> SourceFormat:
        """Raises: ValueError for a stored value of the wrong shape."""
        if not isinstance(raw, dict):
            raise ValueError("a source format is an object")
        encoding, delimiter = raw.get("encoding"), raw.get("delimiter", ",")
        pairs = raw.get("header_map", [])
        if not (encoding is None or isinstance(encoding, str)) or not isinstance(delimiter, str):
            raise ValueError("bad encoding or delimiter")
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p)
            for p in pairs
        ):
            raise ValueError("bad header map")
        return cls(encoding, delimiter, tuple((str(a), str(b)) for a, b in pairs))


@dataclass(frozen=True)
class ScannedFile:
    """What :func:`scan` learnt: the file's SHA-256 (hex), its encoding and its size."""

    sha256: str
    encoding: str
    size: int


def encoding_name(name: str) -> str:
    """The canonical name of an encoding an operator named (``UTF8`` → ``utf-8``, ``cp936`` →
    ``gbk``).

    Raises:
        MalformedInput: not one of :data:`ENCODINGS` (under any of its aliases).
    """
    try:
        canonical = codecs.lookup(name.strip()).name
    except (LookupError, ValueError):
        canonical = ""
    if canonical == "utf-8-sig":
        canonical = "utf-8"
    if canonical not in ENCODINGS:
        raise MalformedInput(
            f"encoding {name!r} is not one of {', '.join(ENCODINGS)}", field="encoding"
        )
    return canonical


def validate(source: SourceFormat) -> SourceFormat:
    """Return ``source`` canonicalised (encoding name, header map stripped).

    Raises:
        MalformedInput: an unknown encoding or delimiter; a header mapped twice, to an empty
            name, or two headers mapped to one name.
    """
    encoding = None if source.encoding is None else encoding_name(source.encoding)
    if source.delimiter not in DELIMITERS:
        shown = ", ".join(repr(d) for d in DELIMITERS)
        raise MalformedInput(
            f"delimiter {source.delimiter!r} is not one of {shown}", field="delimiter"
        )
    pairs = tuple((header.strip(), name.strip()) for header, name in source.header_map)
    for header, name in pairs:
        if not header or not name:
            raise MalformedInput("a header map entry is HEADER=NAME, both non-empty", field="map")
    headers = [h for h, _ in pairs]
    names = [n for _, n in pairs]
    for values, what in ((headers, "header"), (names, "column name")):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise MalformedInput(
                f"the header map names the {what} {repeated[0]!r} twice", field="map"
            )
    return SourceFormat(encoding, source.delimiter, pairs)


def _first_error(path: Path, encoding: str) -> tuple[int, bool]:
    """The 1-based line holding the first byte ``encoding`` cannot decode, and whether a line
    before it held non-ASCII text that did decode (see the module docstring: a multi-byte
    character never spans a line break, so lines decode alone)."""
    decode = codecs.getdecoder("utf-8-sig" if encoding == "utf-8" else encoding)
    number, decoded_non_ascii = 0, False
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                decode(line, "strict")
            except UnicodeDecodeError:
                return number, decoded_non_ascii
            decoded_non_ascii = decoded_non_ascii or not line.isascii()
    return max(number, 1), decoded_non_ascii


def _decodes(
    path: Path,
    encoding: str,
    update: Callable[[bytes], None] | None,
    on_bytes: Callable[[int], None],
) -> bool:
    """Whether ``encoding`` decodes all of ``path``; ``update`` (a digest's) sees every byte,
    so with it the file is read to its end even after a failure."""
    decoder = codecs.getincrementaldecoder("utf-8-sig" if encoding == "utf-8" else encoding)()
    done = 0
    ok = True
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            if update is not None:
                update(chunk)
            if ok:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError:
                    ok = False
                    if update is None:
                        return False
            done += len(chunk)
            on_bytes(done)
    if ok:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            ok = False
    return ok


def scan(path: Path, encoding: str | None, progress: ProgressCallback | None = None) -> ScannedFile:
    """Hash ``path`` and find its encoding (see the module docstring).

    Args:
        encoding: the operator's named encoding (canonical, see :func:`encoding_name`), or
            ``None`` to detect one of :data:`DETECTED`.

    Raises:
        NotFound: no such file.
        MalformedInput: the named encoding, or every detected candidate, fails on some byte
            (the message names the line).
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise NotFound(f"no file {path}") from None
    if path.is_dir():
        raise MalformedInput(f"{path} is a folder, not a file")

    def report(done: int) -> None:
        if progress is not None:
            progress("scanning", done, size)

    digest = hashlib.sha256()
    candidates = (encoding,) if encoding is not None else DETECTED
    for index, candidate in enumerate(candidates):
        if _decodes(path, candidate, digest.update if index == 0 else None, report):
            return ScannedFile(digest.hexdigest(), candidate, size)
        if index == 0 and encoding is None:
            line, mixed = _first_error(path, candidate)
            if mixed:
                # UTF-8 text up to here, then something else: GBK would decode the UTF-8 part
                # into the wrong characters, so the file is refused rather than garbled.
                raise MalformedInput(
                    f"{path}: line {line} is not valid UTF-8 though earlier lines with "
                    "non-ASCII text are: the file mixes encodings; if it is all in one, name "
                    f"it with --encoding ({', '.join(ENCODINGS)})",
                    field="encoding",
                )
    line, _ = _first_error(path, candidates[-1])
    if encoding is not None:
        raise MalformedInput(
            f"{path}: line {line} is not valid {encoding}; name the file's encoding with "
            f"--encoding ({', '.join(ENCODINGS)})",
            field="encoding",
        )
    raise MalformedInput(
        f"{path}: line {line} is not valid in any of {', '.join(DETECTED)}; name the file's "
        f"encoding with --encoding ({', '.join(ENCODINGS)})",
        field="encoding",
    )


def rename(header: Sequence[str], header_map: Sequence[tuple[str, str]], path: Path) -> list[str]:
    """The file's header with mapped names in place of the mapped headers.

    Raises:
        MalformedInput: a mapped header the file does not have.
    """
    present = set(header)
    missing = [h for h, _ in header_map if h not in present]
    if missing:
        raise MalformedInput(
            f"{path}: the header map names header(s) {', '.join(map(repr, missing))} that the "
            f"file does not have; its headers: {', '.join(map(repr, header))}",
            field="map",
        )
    names = dict(header_map)
    return [names.get(h, h) for h in header]


class _HashingReader(io.RawIOBase):
    """A binary file that hashes and counts the bytes read through it."""

    def __init__(self, raw: io.BufferedReader) -> None:
        super().__init__()
        self._raw = raw
        self.digest = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._raw.close()
        super().close()

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer)
        if n:
            self.digest.update(memoryview(buffer)[:n])
            self.count += n
        return n or 0


@dataclass(frozen=True)
class Row:
    """One record: its 1-based row number (the header not counted), its last line in the file,
    and its cells, stripped of surrounding blanks."""

    number: int
    line: int
    cells: list[str]


class SourceReader:
    """The rows of a scanned file (see :func:`read`)."""

    def __init__(self, path: Path, scanned: ScannedFile, source: SourceFormat) -> None:
        self.path = path
        self._scanned = scanned
        self._raw = _HashingReader(path.open("rb"))
        encoding = "utf-8-sig" if scanned.encoding == "utf-8" else scanned.encoding
        self._text = io.TextIOWrapper(io.BufferedReader(self._raw), encoding=encoding, newline="")
        self._reader = csv.reader(self._text, delimiter=source.delimiter, strict=True)
        try:
            try:
                first = next(self._reader)
            except StopIteration:
                raise MalformedInput(f"{path}: empty file, no header row") from None
            except (csv.Error, UnicodeDecodeError) as exc:
                raise MalformedInput(f"{path}: unreadable header: {exc}") from None
            self.header = rename([cell.strip() for cell in first], source.header_map, path)
        except BaseException:
            self.close()
            raise

    @property
    def bytes_read(self) -> int:
        return self._raw.count

    def rows(self) -> Iterator[Row]:
        """The records after the header; a blank line counts as a row and yields no cells.

        Raises:
            MalformedInput: unreadable CSV (a row number and line given), or a file that
                changed since it was scanned.
        """
        number = 0
        while True:
            try:
                record = next(self._reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as exc:
                raise MalformedInput(
                    f"row {number + 1} (line {self._reader.line_num}): unreadable CSV: {exc}"
                ) from None
            number += 1
            yield Row(number, self._reader.line_num, [cell.strip() for cell in record])
        if self._raw.digest.hexdigest() != self._scanned.sha256:
            raise MalformedInput(f"{self.path} changed while it was being imported; try again")

    def close(self) -> None:
        self._text.close()


@contextmanager
def read(path: Path, scanned: ScannedFile, source: SourceFormat) -> Iterator[SourceReader]:
    """Open a scanned file for its rows (``reader.header``, then ``reader.rows()``).

    Raises:
        NotFound: the file went away since it was scanned.
        MalformedInput: no header row, an unreadable header, or a mapped header it lacks.
    """
    try:
        reader = SourceReader(path, scanned, source)
    except FileNotFoundError:
        raise NotFound(f"no file {path}") from None
    try:
        yield reader
    finally:
        reader.close()
