"""node.toml's [engines] table: the RR22 engine's interpreter, off unless set."""

from __future__ import annotations

from pathlib import Path

import pytest

from govshare.node.config import NodeConfig, write_default
from govshare.protocols.errors import MalformedInput


def home_with(tmp_path: Path, engines: str, listen: str = "127.0.0.1:7001") -> Path:
    home = tmp_path / "node"
    config = write_default(home, listen=listen)
    text = config.read_text()
    start = text.index("[engines]")
    top, rest = (engines, "") if not engines.startswith("[") else ("", engines)
    config.write_text(top + text[:start] + rest)  # a top-level key goes before any table
    return home


def test_the_default_config_offers_no_rr22_engine(tmp_path: Path) -> None:
    home = tmp_path / "node"
    write_default(home, listen="10.0.0.5:7001")
    engines = NodeConfig.load(home).engines
    assert engines.rr22_python is None and engines.rr22_low_comm is False
    assert engines.link_host == "10.0.0.5"


def test_rr22_python_is_read_relative_to_the_home(tmp_path: Path) -> None:
    home = home_with(tmp_path, '[engines]\nrr22_python = "sf/bin/python"\nrr22_low_comm = true\n')
    engines = NodeConfig.load(home).engines
    assert engines.rr22_python == home / "sf/bin/python" and engines.rr22_low_comm is True
    absolute = home_with(tmp_path / "b", '[engines]\nrr22_python = "/opt/sf/bin/python"\n')
    assert NodeConfig.load(absolute).engines.rr22_python == Path("/opt/sf/bin/python")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[engines]\nrr22_python = 3\n", "engines.rr22_python must be a path"),
        ('[engines]\nrr22_low_comm = "yes"\n', "engines.rr22_low_comm must be true or false"),
        ('engines = "rr22"\n', r"\[engines\] must be a table"),
    ],
)
def test_a_bad_engines_table_is_refused_naming_the_key(
    tmp_path: Path, table: str, message: str
) -> None:
    with pytest.raises(MalformedInput, match=message):
        NodeConfig.load(home_with(tmp_path, table))
