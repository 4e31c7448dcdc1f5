"""The command line as a user drives it: help, submit with good and bad files, config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ccied.bench.cluster import PeerProcess
from ccied.peer.cli import build_parser
from ccied.peer.config import peer_config
from ccied.peer.daemon import Role
from ccied.peer.errors import PeerError
from ccied.pruning import find_clip

CCIED = [sys.executable, "-m", "ccied.peer.cli"]
JSON_FIELDS = {
    "frame",
    "label",
    "class_name",
    "confidence",
    "source",
    "served_by",
    "latency_ms",
    "bytes_sent",
}


@pytest.mark.parametrize("command", ["peer", "submit", "status", "splits", "demo"])
def test_every_command_has_help(command: str) -> None:
    done = subprocess.run([*CCIED, command, "--help"], capture_output=True, text=True, check=True)
    assert "usage: ccied " + command in done.stdout


def test_config_file_sets_defaults_and_options_override_it(tmp_path: Path) -> None:
    config = tmp_path / "peer.toml"
    config.write_text(
        'role = "cloud"\nname = "c9"\nlisten = "tcp://127.0.0.1:7777"\nsocket = "none"\n'
        'remote_timeout_s = 0.5\npeer = ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]\n'
    )
    args = build_parser().parse_args(["peer", "--config", str(config), "--name", "other"])
    cfg = peer_config(args)
    assert cfg.role is Role.CLOUD and cfg.name == "other" and cfg.socket_path is None
    assert cfg.listen == "tcp://127.0.0.1:7777" and cfg.remote_timeout_s == 0.5
    assert cfg.peers == ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    config.write_text('rol = "cloud"\n')
    with pytest.raises(PeerError, match=r"unknown keys \['rol'\]"):
        peer_config(build_parser().parse_args(["peer", "--config", str(config)]))


def test_submit_without_a_peer_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [*CCIED, "submit", "--socket", str(tmp_path / "none.sock"), "x.png"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "no peer at" in done.stderr and "ccied peer" in done.stderr


@pytest.mark.slow
def test_submit_prints_one_json_line_per_frame_and_reports_bad_files(
    lone_peer: PeerProcess, cat_png: Path, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\x00garbage" * 100)
    clip = find_clip("carphone_pristine.mp4")
    done = subprocess.run(
        [*CCIED, "submit", "--socket", str(lone_peer.socket_path), "--json", "--every", "60",
         str(cat_png), str(junk), str(clip)],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["frame"] for line in lines] == [
        "cat.png",
        str(junk),
        "carphone_pristine.mp4#0",
        "carphone_pristine.mp4#60",
    ]
    assert "not a readable image or video" in lines[1]["error"]
    for line in (lines[0], lines[2], lines[3]):
        assert set(line) >= JSON_FIELDS and line["source"] == "local"
        assert line["served_by"] == "solo" and line["bytes_sent"] == 0
    assert done.returncode == 1  # one file failed; the others were still answered

    status = subprocess.run(
        [*CCIED, "status", "--socket", str(lone_peer.socket_path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    counters = json.loads(status.stdout)["requests"]
    assert counters["answered"] >= 3 and counters["by_source"]["local"] >= 3


def _console(*args: str) -> list[str]:
    """The installed console script (ccied.peer.entry), as a user runs it."""
    return [sys.executable, "-c", "import sys; from ccied.peer.entry import main; sys.exit(main())",
            *args]  # fmt: skip


@pytest.mark.parametrize("delay_s", [0.3, 2.0])
def test_ctrl_c_during_start_up_is_one_line(tmp_path: Path, delay_s: float) -> None:
    import signal
    import time

    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    args = ["peer", "--insecure", "--no-discovery", "--listen", "none"]
    process = subprocess.Popen(
        [*_console(*args, "--socket", str(folder / "p.sock"))],
        stderr=subprocess.PIPE,
        text=True,
        # Background processes inherit SIGINT ignored; a terminal's Ctrl-C does not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(delay_s)  # importing torch, or loading the model
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode in (0, 130), stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert not (folder / "p.sock").exists()


def test_a_reader_that_leaves_early_is_no_traceback() -> None:
    # `ccied splits | head -1`: the pipe closes before everything is written.
    process = subprocess.Popen(
        _console("splits"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    process.stdout.close()
    stderr = process.stderr.read() if process.stderr else ""
    process.wait(timeout=120)
    assert process.returncode == 141, stderr
    assert stderr == ""


def test_keys_list_shows_the_folders_own_key_then_the_trusted_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ccied.peer.cli import main
    from ccied.peer.keys import KeyStore

    state = tmp_path / "state"
    assert main(["keys", "list", "--state-dir", str(state)]) == 0
    assert capsys.readouterr().out == (
        f"no key and no trusted keys in {state} (a peer makes its own on start)\n"
    )
    assert not state.exists()  # listing creates nothing
    # Peers started with this folder share its key: they trust each other with
    # nothing in trusted/, and the list says so.
    own = KeyStore(state).generate("cam1").public
    other = KeyStore(tmp_path / "other").generate("laptop").public
    capsys.readouterr()
    assert main(["keys", "--state-dir", str(state), "list"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.split()[:2] == ["cam1", own] and "own key: every peer using this state" in line
    # "--" before the key: a Z85 key may begin with "-" (1 in 85; this failed once).
    assert main(["keys", "--state-dir", str(state), "trust", "--name", "laptop", "--", other]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--state-dir", str(state)]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("cam1") and second.split() == ["laptop", other]
