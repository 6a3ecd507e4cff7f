"""Reading department files: encodings named or detected, delimiters, header maps, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from govshare.node.data import source_file
from govshare.node.data.source_file import SourceFormat, encoding_name, read, scan, validate
from govshare.protocols.errors import MalformedInput, NotFound

HEADER = "身份证号,姓名,金额"
ROWS = ["110101199001010011,张三,12.50", "110101199001010022,李四,7"]


def write(path: Path, text: str, encoding: str) -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def rows_of(path: Path, source: SourceFormat | None = None) -> tuple[list[str], list[list[str]]]:
    source = validate(source or SourceFormat())
    scanned = scan(path, source.encoding)
    with read(path, scanned, source) as reader:
        return reader.header, [row.cells for row in reader.rows() if row.cells]


@pytest.mark.parametrize(
    ("encoding", "detected"),
    [("utf-8", "utf-8"), ("utf-8-sig", "utf-8"), ("gbk", "gbk"), ("gb18030", "gb18030")],
)
def test_encoding_detected(tmp_path: Path, encoding: str, detected: str) -> None:
    text = "\n".join([HEADER, *ROWS]) + "\n"
    if encoding == "gb18030":
        text = text.replace("张三", "张𠀀")  # outside GBK: GB18030's four-byte form
    path = write(tmp_path / "f.csv", text, encoding)
    assert scan(path, None).encoding == detected
    header, rows = rows_of(path)
    assert header == ["身份证号", "姓名", "金额"]
    assert rows[1] == ["110101199001010022", "李四", "7"]


def test_named_encoding_is_checked_over_the_whole_file(tmp_path: Path) -> None:
    lines = [HEADER, *ROWS, "110101199001010033,王五,1"]
    data = "\n".join(lines).encode("utf-8") + b"\n" + "赵六".encode("gbk") + b"\n"
    path = tmp_path / "mixed.csv"
    path.write_bytes(data)
    with pytest.raises(MalformedInput, match=r"line 5 is not valid utf-8") as info:
        scan(path, "utf-8")
    assert info.value.field == "encoding"
    # UTF-8 Chinese text then GBK: GBK would "decode" the UTF-8 lines into the wrong
    # characters, so detection refuses the file instead of picking GBK.
    with pytest.raises(MalformedInput, match=r"line 5 is not valid UTF-8 though earlier lines"):
        scan(path, None)


def test_latin_bytes_refused_without_quoting_them(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes(b"a,b\nJos\xe9,1\n")
    with pytest.raises(MalformedInput) as info:
        scan(path, None)
    assert "line 2" in str(info.value) and "Jos" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "canonical"),
    [("UTF8", "utf-8"), ("utf-8-sig", "utf-8"), ("cp936", "gbk"), ("GB18030", "gb18030")],
)
def test_encoding_names(name: str, canonical: str) -> None:
    assert encoding_name(name) == canonical


@pytest.mark.parametrize("name", ["latin-1", "utf-16", "rot13", "nonsense", ""])
def test_other_encodings_refused(name: str) -> None:
    with pytest.raises(MalformedInput, match="is not one of"):
        encoding_name(name)


@pytest.mark.parametrize("delimiter", ["\t", ";", "|"])
def test_delimiters(tmp_path: Path, delimiter: str) -> None:
    text = "\n".join(line.replace(",", delimiter) for line in [HEADER, *ROWS]) + "\n"
    path = write(tmp_path / "f.txt", text, "utf-8")
    _, rows = rows_of(path, SourceFormat(delimiter=delimiter))
    assert rows[0] == ["110101199001010011", "张三", "12.50"]


def test_unknown_delimiter_refused() -> None:
    with pytest.raises(MalformedInput, match="delimiter"):
        validate(SourceFormat(delimiter=":"))


def test_header_map_renames_and_checks(tmp_path: Path) -> None:
    path = write(tmp_path / "f.csv", "\n".join([HEADER, *ROWS]) + "\n", "gbk")
    mapped = SourceFormat(header_map=(("身份证号", "id_number"), (" 金额 ", "amount")))
    header, _ = rows_of(path, mapped)
    assert header == ["id_number", "姓名", "amount"]
    with pytest.raises(MalformedInput, match="'电话' that the file does not have") as info:
        rows_of(path, SourceFormat(header_map=(("电话", "phone"),)))
    assert info.value.field == "map"
    for pairs, message in (
        ((("身份证号", "a"), ("身份证号", "b")), "header '身份证号' twice"),
        ((("身份证号", "a"), ("姓名", "a")), "column name 'a' twice"),
        ((("身份证号", " "),), "both non-empty"),
    ):
        with pytest.raises(MalformedInput, match=message):
            validate(SourceFormat(header_map=pairs))


def test_a_file_changed_after_its_scan_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "f.csv", "\n".join([HEADER, *ROWS]) + "\n", "utf-8")
    scanned = scan(path, None)
    path.write_text("\n".join([HEADER, ROWS[0]]) + "\n", encoding="utf-8")
    with (
        read(path, scanned, SourceFormat()) as reader,
        pytest.raises(MalformedInput, match="changed"),
    ):
        list(reader.rows())


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        scan(tmp_path / "none.csv", None)
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(MalformedInput, match="no header"):
        rows_of(empty)


def test_progress_reports_the_whole_file(tmp_path: Path) -> None:
    path = write(tmp_path / "f.csv", "\n".join([HEADER, *ROWS * 1000]) + "\n", "gbk")
    seen: list[tuple[str, int, int]] = []
    scan(path, None, lambda phase, done, total: seen.append((phase, done, total)))
    size = path.stat().st_size
    assert seen[-1] == ("scanning", size, size)


@given(
    st.lists(
        st.lists(
            st.text(st.characters(codec="gbk", exclude_categories=("Cs", "Cc"))),
            min_size=3,
            max_size=3,
        ),
        min_size=1,
        max_size=20,
    ),
    st.sampled_from(["utf-8", "gbk", "gb18030"]),
    st.sampled_from(source_file.DELIMITERS),
)
def test_rows_round_trip_through_any_encoding_and_delimiter(
    tmp_path_factory: pytest.TempPathFactory,
    rows: list[list[str]],
    encoding: str,
    delimiter: str,
) -> None:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\r\n")
    writer.writerow(["a", "b", "c"])
    writer.writerows(rows)
    path = tmp_path_factory.mktemp("rt") / "f.csv"
    path.write_bytes(buffer.getvalue().encode(encoding))
    source = SourceFormat(encoding=encoding, delimiter=delimiter)
    with read(path, scan(path, encoding), source) as reader:
        got = [row.cells for row in reader.rows()]
    assert got == [[cell.strip() for cell in row] for row in rows]
