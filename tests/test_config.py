"""A peer's settings are checked before it starts: wrong values are one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ccied.peer.cli import build_parser
from ccied.peer.config import check_name, check_peer_address, check_tcp_address, peer_config
from ccied.peer.errors import PeerError

CCIED = [sys.executable, "-m", "ccied.peer.cli"]


def _config(tmp_path: Path, text: str, *options: str) -> object:
    path = tmp_path / "peer.toml"
    path.write_text(text)
    return peer_config(build_parser().parse_args(["peer", "--config", str(path), *options]))


@pytest.mark.parametrize("key", ["insecure", "no_cache", "share_cache", "no_discovery"])
@pytest.mark.parametrize("text", ['"false"', '"true"', "0", "1"])
def test_booleans_in_a_config_file_are_toml_booleans_only(
    tmp_path: Path, key: str, text: str
) -> None:
    # insecure = "false" used to turn authentication off: bool("false") is True.
    with pytest.raises(PeerError, match=rf"{key} .*must be true or false"):
        _config(tmp_path, f"{key} = {text}\n")


def test_toml_booleans_mean_what_they_say(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "insecure = false\nno_cache = true\nshare_cache = false\n")
    assert cfg.insecure is False  # type: ignore[attr-defined]
    assert cfg.cache_enabled is False  # type: ignore[attr-defined]
    assert cfg.share_cache is False  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("listen = 5", "listen .*must be a string"),
        ("max_pending = 0", "max_pending .*at least 1"),
        ("max_pending = 2.5", "max_pending .*an integer"),
        ("remote_timeout_s = 0", "remote_timeout_s .*above 0"),
        ('remote_timeout_s = "1"', "remote_timeout_s .*a number"),
        ("audit_rate = 2", "audit_rate .*at most 1"),
        ("fidelity_floor_all = 1.5", "fidelity_floor_all .*at most 1"),
        ('fidelity_floor = "high"', "fidelity_floor .*a number"),
        ("slowdown = 0.5", "slowdown .*at least 1"),
        ("slowdown = nan", "slowdown .*finite"),
        ("cache_capacity = true", "cache_capacity .*an integer"),
        ('role = "router"', "role .*one of edge, cloud"),
        ("peer = [1, 2]", "peer .*list of strings"),
        ('log_level = "loud"', "log_level .*one of"),
        ('accept_shared_from = "all"', "accept_shared_from .*one of"),
    ],
)
def test_a_wrong_value_names_the_setting(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(PeerError, match=message):
        _config(tmp_path, line + "\n")


@pytest.mark.parametrize("name", ["../../evil", "a/b", "cam\nforged line", "", ".hidden", "x" * 65])
def test_names_outside_the_alphabet_are_refused(name: str) -> None:
    # "../../evil" put the socket outside the runtime folder; a newline went into logs.
    with pytest.raises(PeerError, match="peer name"):
        check_name(name)


def test_names_in_the_alphabet_pass() -> None:
    assert check_name("cam-1.front_door") == "cam-1.front_door"


@pytest.mark.parametrize(
    "address",
    [
        "tcp://127.0.0.1:70000",  # ZeroMQ listened on 4464 (70000 mod 65536)
        "127.0.0.1:5601",  # no scheme: 28-line tracebacks twice a second, forever
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:port",
        "tcp://:5601",
        "tcp://bad host:5601",
        "ipc:///tmp/x",
    ],
)
def test_bad_addresses_are_refused(address: str) -> None:
    with pytest.raises(PeerError, match=r"tcp://HOST:PORT|port|host"):
        check_tcp_address(address, "--listen", bind=True)
    with pytest.raises(PeerError):
        check_peer_address(address, "--cloud")


def test_good_addresses_pass() -> None:
    for address in ("tcp://127.0.0.1:5601", "tcp://cloud.local:1", "tcp://[::1]:65535"):
        assert check_peer_address(address, "--cloud") == address
    for address in ("tcp://127.0.0.1:*", "tcp://*:5601", "tcp://0.0.0.0:0"):
        assert check_tcp_address(address, "--listen", bind=True) == address
    with pytest.raises(PeerError, match="port"):
        check_tcp_address("tcp://127.0.0.1:0", "--cloud")


def test_a_malformed_key_in_a_keyed_address_is_one_error() -> None:
    # A Z85 key whose 4-byte groups overflow used to raise struct.error.
    with pytest.raises(PeerError, match=r"--cloud.*Z85"):
        check_peer_address("#" * 40 + "@tcp://127.0.0.1:5601", "--cloud")


@pytest.mark.parametrize(
    ("args", "text", "message"),
    [
        ([], 'insecure = "false"\n', "insecure (--insecure) must be true or false"),
        (["--listen", "tcp://127.0.0.1:70000"], "", "port must be a number from 1 to 65535"),
        (["--cloud", "127.0.0.1:5601"], "", "expected tcp://HOST:PORT"),
        (["--name", "../../evil"], "", "peer name '../../evil'"),
    ],
)
def test_ccied_peer_refuses_bad_settings_in_one_line(
    tmp_path: Path, args: list[str], text: str, message: str
) -> None:
    config = tmp_path / "peer.toml"
    config.write_text(text)
    done = subprocess.run(
        [*CCIED, "peer", "--config", str(config), "--socket", str(tmp_path / "p.sock"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "p.sock").exists()


# -- the local socket's folder -------------------------------------------------------


def test_a_socket_folder_others_can_write_or_do_not_own_is_refused(tmp_path: Path) -> None:
    import os

    from ccied.peer.server import prepare_socket_path as _prepare_socket_path

    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    _prepare_socket_path(folder / "p.sock")  # ours and 0700: fine
    folder.chmod(0o755)
    with pytest.raises(PeerError, match="must be 0700"):
        _prepare_socket_path(folder / "p.sock")
    folder.chmod(0o700)
    if os.geteuid() == 0:  # only root can hand a folder to another user
        os.chown(folder, 65534, 65534)
        with pytest.raises(PeerError, match="belongs to uid 65534"):
            _prepare_socket_path(folder / "p.sock")
    link = tmp_path / "link"
    link.symlink_to(folder, target_is_directory=True)
    with pytest.raises(PeerError, match="not a folder"):
        _prepare_socket_path(link / "p.sock")


def test_shutdown_removes_only_the_socket_this_peer_made(tmp_path: Path) -> None:
    import socket

    from ccied.peer.server import unlink_own_socket as _unlink_own_socket

    path = tmp_path / "p.sock"
    ours = socket.socket(socket.AF_UNIX)
    ours.bind(str(path))
    st = path.lstat()
    inode = (st.st_dev, st.st_ino)
    path.unlink()  # another peer took the name over since
    theirs = socket.socket(socket.AF_UNIX)
    theirs.bind(str(path))
    _unlink_own_socket(path, inode)
    assert path.exists()
    _unlink_own_socket(path, (path.lstat().st_dev, path.lstat().st_ino))
    assert not path.exists()
    ours.close()
    theirs.close()
