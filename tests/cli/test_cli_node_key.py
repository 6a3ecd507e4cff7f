"""``govshare node key split|recover`` (cli/node_key.py), driven through click's CliRunner on the
``key`` group itself until it is registered under ``node``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from click.testing import CliRunner

from govshare.cli.node_key import key
from govshare.node.keystore import create_data_key, read_data_key
from govshare.protocols.errors import MalformedInput

OFFICERS = ("wang-li", "chen-jing", "zhao-min")


def _split(tmp_path: Path, suite: str = "sm") -> tuple[Path, Path, dict[str, object]]:
    home = tmp_path / "home"
    home.mkdir(parents=True)
    key_file = create_data_key(home)
    out = tmp_path / "shares"
    args = ["split", "--key-file", str(key_file), "--node", "tax", "-k", "2", "--out", str(out)]
    for officer in OFFICERS:
        args += ["--officer", officer]
    result = CliRunner().invoke(key, [*args, "--suite", suite, "--json"])
    assert result.exit_code == 0, result.output
    return home, out, json.loads(result.output)


def test_split_writes_one_private_labelled_file_per_officer(tmp_path: Path) -> None:
    _, out, report = _split(tmp_path)
    assert (report["k"], report["n"], report["suite"]) == (2, 3, "sm")
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [
        "tax.1.wang-li.share.json",
        "tax.2.chen-jing.share.json",
        "tax.3.zhao-min.share.json",
    ]
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
        labels = json.loads(f.read_text())
        assert labels["key_check_value"] == report["key_check_value"]
        assert (labels["k"], labels["n"]) == (2, 3)


def test_recover_from_two_of_three(tmp_path: Path) -> None:
    home, out, _ = _split(tmp_path)
    recovered = tmp_path / "recovered.key"
    shares = [str(out / "tax.1.wang-li.share.json"), str(out / "tax.3.zhao-min.share.json")]
    result = CliRunner().invoke(key, ["recover", *shares, "--out", str(recovered), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["officers"] == ["wang-li", "zhao-min"]
    assert recovered.read_bytes() == read_data_key(home)
    assert stat.S_IMODE(os.stat(recovered).st_mode) == 0o600
    # Never overwrites: a second recovery into the same file fails.
    again = CliRunner().invoke(key, ["recover", *shares, "--out", str(recovered)])
    assert isinstance(again.exception, FileExistsError)


def test_recover_refuses_one_share_and_writes_nothing(tmp_path: Path) -> None:
    _, out, _ = _split(tmp_path, suite="standard")
    recovered = tmp_path / "recovered.key"
    result = CliRunner().invoke(
        key, ["recover", str(out / "tax.2.chen-jing.share.json"), "--out", str(recovered)]
    )
    assert isinstance(result.exception, MalformedInput)
    assert "2 of 3 shares are needed, 1 given" in str(result.exception)
    assert not recovered.exists()


def test_recover_refuses_an_altered_share(tmp_path: Path) -> None:
    _, out, _ = _split(tmp_path, suite="standard")
    path = out / "tax.1.wang-li.share.json"
    body = json.loads(path.read_text())
    body["share"] = ("1" if body["share"][0] != "1" else "2") + body["share"][1:]
    path.write_text(json.dumps(body))
    recovered = tmp_path / "recovered.key"
    files = [str(path), str(out / "tax.2.chen-jing.share.json")]
    result = CliRunner().invoke(key, ["recover", *files, "--out", str(recovered)])
    assert isinstance(result.exception, MalformedInput)  # checksum
    assert "checksum" in str(result.exception)
    assert not recovered.exists()


def test_recover_refuses_shares_that_do_not_make_the_key(tmp_path: Path) -> None:
    _, out, _ = _split(tmp_path, suite="standard")
    _, other, _ = _split(tmp_path / "again", suite="standard")  # another key, another split
    files = [str(out / "tax.1.wang-li.share.json"), str(other / "tax.2.chen-jing.share.json")]
    result = CliRunner().invoke(key, ["recover", *files, "--out", str(tmp_path / "k")])
    assert isinstance(result.exception, MalformedInput)
    assert "different splits" in str(result.exception)
    assert not (tmp_path / "k").exists()


def test_split_prints_a_table(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    key_file = create_data_key(home)
    args = ["split", "--key-file", str(key_file), "--node", "tax", "-k", "2"]
    args += ["--officer", "wang-li", "--officer", "chen-jing", "--out", str(tmp_path / "s")]
    result = CliRunner().invoke(key, args)
    assert result.exit_code == 0, result.output
    assert "wang-li" in result.output and "2 of 2" in result.output
    refused = CliRunner().invoke(key, [*args[:-1], str(tmp_path / "t"), "--officer", "x/y"])
    assert isinstance(refused.exception, MalformedInput)
    assert not (tmp_path / "t").exists()
