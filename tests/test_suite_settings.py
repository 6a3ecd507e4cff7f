"""The suite's own rules: nothing in it depends on how fast the machine is."""

from __future__ import annotations

from hypothesis import settings


def test_hypothesis_examples_have_no_deadline() -> None:
    # A test module's @settings(max_examples=...) inherits the profile conftest loads: an
    # example that takes long on a busy machine is never a failure.
    assert settings().deadline is None
    assert settings(max_examples=7).deadline is None
    assert settings.get_profile("govshare").deadline is None
