"""The deployment files: the systemd unit passes ``systemd-analyze verify``, the Docker image
builds where a Docker daemon answers (and its Dockerfile is checked line by line everywhere),
and the sdist carries the LICENSE and the tests' conftest.py."""

from __future__ import annotations

import configparser
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
from conftest import REPO

from govshare.node.config import DEFAULT_GRACE_SECONDS, DOCUMENTED_METRICS_ADDRESS, METRICS_ENV
from govshare.node.observability.endpoint import ServiceEndpoint

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "govshare-node@.service"
DOCKERFILE = DEPLOY / "Dockerfile"
HOME = "/var/lib/govshare"
VENV_GOVSHARE = "/opt/govshare/venv/bin/govshare"
# md5 of the Apache License 2.0 text as the ASF publishes it (LICENSE-2.0.txt, 11,358 bytes).
APACHE_2_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"
TIMEOUT = 600


# --- systemd ----------------------------------------------------------------------------------


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_runs_node_serve_on_its_instance_home_hardened() -> None:
    service = unit()["Service"]
    command = shlex.split(service["ExecStart"])
    assert command == [VENV_GOVSHARE, "node", "serve", "--home", f"{HOME}/%i"]
    assert service["User"] == "govshare"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == f"{HOME}/%i"
    assert service["PrivateTmp"] == "yes"
    assert service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > DEFAULT_GRACE_SECONDS
    assert service["CapabilityBoundingSet"] == ""
    # The same command from this checkout's environment: it exists and takes those options.
    here = Path(sys.executable).parent / "govshare"
    shown = subprocess.run(
        [str(here), *command[1:3], "--help"], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert "--home" in shown.stdout


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: `make pytest` installs it (Debian's systemd)")
    # verify insists that ExecStart's program exists: point it at this checkout's venv.
    here = Path(sys.executable).parent / "govshare"
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(VENV_GOVSHARE, str(here)))
    for name in (copy, tmp_path / "govshare-node@tax.service"):
        checked = subprocess.run(
            [analyze, "verify", "--man=no", str(name)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        # verify exits 0 on unknown keys and bad values too, with a warning: none allowed.
        assert (checked.returncode, checked.stderr) == (0, ""), checked.stderr


# --- Docker -----------------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    joined = DOCKERFILE.read_text().replace("\\\n", " ")
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), " ".join(rest.split())))
    return result


def test_the_dockerfile_builds_the_node_as_documented() -> None:
    steps = instructions()
    words = [w for w, _ in steps]
    stages = [a for w, a in steps if w == "FROM"]
    # A build stage compiles the wheel (with the native PSI path); the node runs on the slim
    # image, whose Python already carries OpenSSL's libcrypto (libssl3): no package added.
    assert stages == ["python:3.11-slim AS build", "python:3.11-slim"]
    runs = " ".join(a for w, a in steps if w == "RUN")
    assert "libssl-dev" in runs and "sodium" not in runs
    assert "x25519_batch.available()" in runs  # the image refuses to build without it
    cmd = json.loads(dict(steps)["CMD"])
    assert cmd == ["govshare", "node", "serve", "--home", HOME]
    users = [a for w, a in steps if w == "USER"]
    assert users == ["govshare"] and words.index("USER") < words.index("CMD")
    assert json.loads(dict(steps)["VOLUME"]) == [HOME]
    env = dict(steps)["ENV"]
    assert f"{METRICS_ENV}={DOCUMENTED_METRICS_ADDRESS}" in env.split()
    assert dict(steps)["STOPSIGNAL"] == "SIGTERM"
    # Every folder of the package (pyproject's package-dir) is copied, and every COPY source
    # exists and is not left out of the build context.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = {p.split("/")[0] for p in project["tool"]["setuptools"]["package-dir"].values()}
    copied: set[str] = set()
    for word, args in steps:
        if word == "COPY" and not args.startswith("--from="):
            *sources, _ = args.split()
            copied.update(s.rstrip("/") for s in sources)
    assert folders | {"setup.py"} <= copied, folders - copied
    assert all((REPO / source).exists() for source in copied), copied
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert all(f"!{source}" in ignore for source in copied)


def test_the_healthcheck_probe_passes_on_200_and_fails_on_503() -> None:
    check = dict(instructions())["HEALTHCHECK"]
    probe = json.loads(check[check.index("CMD") + 3 :].strip())
    assert (
        probe[:2] == ["python", "-c"]
        and f"http://{DOCUMENTED_METRICS_ADDRESS}/healthz" in (probe[2])
    )
    refusal: list[str | None] = [None]
    endpoint = ServiceEndpoint("127.0.0.1:0", metrics=lambda: b"", refusal=lambda: refusal[0])
    endpoint.start()
    try:
        code = probe[2].replace(DOCUMENTED_METRICS_ADDRESS, f"127.0.0.1:{endpoint.port}")
        run = [sys.executable, "-c", code]
        assert subprocess.run(run, capture_output=True, timeout=60).returncode == 0
        refusal[0] = "node tax refuses to serve: its audit log is broken at entry 3"
        assert subprocess.run(run, capture_output=True, timeout=60).returncode != 0
    finally:
        endpoint.stop()


def docker_answers() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        info = subprocess.run([docker, "info"], capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return info.returncode == 0


def test_the_image_builds_where_docker_answers() -> None:
    """With a Docker daemon: build the image and run its govshare. Without: the build context
    the Dockerfile.dockerignore leaves holds every file the Dockerfile copies (the static
    checks above cover the rest)."""
    if docker_answers():
        tag = "govshare-node:test"
        built = subprocess.run(
            ["docker", "build", "-f", str(DOCKERFILE), "-t", tag, str(REPO)],
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
        ran = subprocess.run(
            ["docker", "run", "--rm", tag, "govshare", "node", "serve", "--help"],
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert ran.returncode == 0 and "--home" in ran.stdout, ran.stderr
        user = subprocess.run(
            ["docker", "run", "--rm", tag, "id", "-u"], capture_output=True, text=True,
            timeout=TIMEOUT,
        )  # fmt: skip
        assert user.stdout.strip() == "10001"
        return
    # No daemon here: the image's install step needs pyproject.toml's every package folder
    # with its __init__.py, all inside the context the ignore file leaves.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    for package, folder in project["tool"]["setuptools"]["package-dir"].items():
        assert (REPO / folder).is_dir(), package
        assert package == "govshare.v1" or (REPO / folder / "__init__.py").is_file(), package


# --- the sdist and the licence ----------------------------------------------------------------


def test_the_license_is_the_apache_2_text_pyproject_names() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert project["project"]["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_bytes()
    assert hashlib.md5(text).hexdigest() == APACHE_2_MD5


def test_the_sdist_carries_the_tests_conftest_and_the_license(tmp_path: Path) -> None:
    build = (
        "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    )
    made = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-4000:]
    name = made.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as sdist:
        members = {m.split("/", 1)[1] for m in sdist.getnames() if "/" in m}
    assert {"LICENSE", "tests/conftest.py", "deploy/Dockerfile", "Makefile"} <= members
    assert "deploy/govshare-node@.service" in members
    assert not any("__pycache__" in m for m in members)
