"""Peer identities and the allow-list: CurveZMQ keypairs in a peer's state folder.

Every peer has one CURVE keypair. It is the peer's identity both as a server
(its listening ROUTER) and as a client (the DEALERs it opens to neighbours),
so a key learned either way names the same peer. The state folder holds::

    STATE_DIR/
        identity.key          public certificate (give it to other peers)
        identity.key_secret   secret certificate, mode 0600, never leaves the device
        trusted/NAME.key      public certificates of peers this one accepts

Files use ZeroMQ's certificate format (the one ``zmq.auth`` and libzmq's
``curve_keygen`` write), so keys made by other ZeroMQ tools can be trusted as
they are. They are parsed here, strictly and with a size bound, not by
``zmq.auth.load_certificate``: a trusted folder is input, and a malformed
file must be a clear error that names it.

A peer always trusts its own key: several daemons of one user on one device
may share a state folder and then form one trusted cluster with no setup.
The allow-list is re-read when the ``trusted/`` folder changes, so
``ccied keys trust`` takes effect on running peers without a restart.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import secrets
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
from ccied.peer.errors import PeerError
from zmq.utils import z85

log = logging.getLogger(__name__)

# 32-byte Curve25519 keys are 40 characters of Z85.
KEY_CHARS = 40
MAX_CERTIFICATE_BYTES = 4096
# libzmq before 4.3.2 has known CURVE vulnerabilities (CVE-2019-6250, CVE-2019-13132).
MIN_LIBZMQ = (4, 3, 2)
IDENTITY = "identity"
TRUSTED = "trusted"

_Z85_RE = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_LINE_RE = re.compile(r'^\s+(public-key|secret-key|name)\s*=\s*"([^"]*)"\s*$')
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class KeyFileError(PeerError):
    """A key, certificate or state folder that cannot be used; says which and why."""


@dataclass(frozen=True)
class Keypair:
    """A CURVE keypair, both halves as 40-character Z85 text."""

    public: str
    secret: str

    def __repr__(self) -> str:  # never print the secret by accident
        return f"Keypair(public={self.public!r}, secret=<hidden>)"


def default_state_dir() -> Path:
    """Per-user state: $XDG_STATE_HOME/ccied, else ~/.local/state/ccied."""
    base = os.environ.get("XDG_STATE_HOME")
    return (Path(base) if base else Path.home() / ".local" / "state") / "ccied"


def check_curve_support(
    has_curve: bool | None = None, version: tuple[int, int, int] | None = None
) -> None:
    """Raise a clear KeyFileError unless this libzmq can run CURVE safely."""
    has_curve = zmq.has("curve") if has_curve is None else has_curve
    version = zmq.zmq_version_info() if version is None else version
    if not has_curve:
        raise KeyFileError(
            "this libzmq was built without CURVE security (zmq.has('curve') is False): "
            "install a pyzmq wheel (bundles libzmq with CURVE), or run with --insecure "
            "on a network you trust"
        )
    if tuple(version) < MIN_LIBZMQ:
        found = ".".join(map(str, version))
        need = ".".join(map(str, MIN_LIBZMQ))
        raise KeyFileError(
            f"libzmq {found} has known CURVE vulnerabilities (CVE-2019-6250, "
            f"CVE-2019-13132); ccied needs {need} or later: upgrade pyzmq"
        )


def check_key(text: str, what: str = "key") -> str:
    """``text`` if it is a 40-character Z85 Curve25519 key, else a clear error."""
    if not isinstance(text, str) or not _Z85_RE.fullmatch(text):
        raise KeyFileError(f"{what} is not a 40-character Z85 CURVE key: {str(text)[:60]!r}")
    try:
        if len(z85.decode(text)) != 32:
            raise ValueError("not 32 bytes")
    except (ValueError, TypeError, KeyError, struct.error) as exc:
        # struct.error: a 5-character group above 2**32 - 1 ("#####" and such), which
        # passes the alphabet check; it once killed the ZAP handler from trusted/.
        raise KeyFileError(f"{what} is not valid Z85 ({exc})") from exc
    return text


@dataclass(frozen=True)
class Certificate:
    public: str
    secret: str | None = None
    name: str | None = None  # metadata, when the file names its peer


def read_certificate(path: Path) -> Certificate:
    """The keys (and the peer's name, if given) in a ZeroMQ certificate file."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CERTIFICATE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CERTIFICATE_BYTES:
        raise KeyFileError(f"{path} is not a key file (over {MAX_CERTIFICATE_BYTES} bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"{path} is not a key file (not UTF-8 text)") from exc
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = _LINE_RE.match(line)
        if match:
            field_name, value = match.groups()
            if field_name in found:
                raise KeyFileError(f"{path}: {field_name} appears twice")
            if field_name != "name":
                check_key(value, f"{path}: {field_name}")
            found[field_name] = value
    if "public-key" not in found:
        raise KeyFileError(f"{path} is not a ZeroMQ certificate (no public-key line)")
    name = found.get("name")
    return Certificate(
        found["public-key"],
        found.get("secret-key"),
        name if name and _NAME_RE.fullmatch(name) else None,
    )


def _certificate_text(public: str, secret: str | None, name: str) -> str:
    kind = "Secret" if secret else "Public"
    lines = [
        f"#   ZeroMQ CURVE {kind} Certificate, written by ccied "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        "#   DO NOT GIVE THIS FILE TO ANYONE." if secret else "#   Give this file to peers.",
        "",
        "metadata",
        f'    name = "{name}"',
        "curve",
        f'    public-key = "{public}"',
    ]
    if secret:
        lines.append(f'    secret-key = "{secret}"')
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str, mode: int, *, replace: bool = True) -> None:
    """Write ``text`` to ``path`` crash-safe: temp file with ``mode``, fsync, rename.

    With ``replace=False`` the file is linked into place instead, which fails
    with FileExistsError when another process made it first.
    """
    temp = path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(temp, path)
        else:
            os.link(temp, path)
            temp.unlink()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _make_private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror or exc}") from exc


class KeyStore:
    """A peer's state folder: its keypair and the public keys it trusts."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir).expanduser()
        self.trusted_dir = self.state_dir / TRUSTED
        self.public_file = self.state_dir / f"{IDENTITY}.key"
        self.secret_file = self.state_dir / f"{IDENTITY}.key_secret"
        self._lock = threading.Lock()
        self._trusted: dict[str, str] = {}
        self._seen: tuple[int, int] | None = None
        self._own: str | None = None

    # -- identity ---------------------------------------------------------------

    def exists(self) -> bool:
        return self.secret_file.exists()

    def generate(self, name: str = "peer", *, force: bool = False) -> Keypair:
        """Create this peer's keypair; refuses to replace one unless ``force``."""
        if self.exists() and not force:
            raise KeyFileError(
                f"{self.secret_file} exists: this peer already has a key "
                "(--force replaces it, and every peer that trusted the old one must "
                "trust the new one)"
            )
        return self._create(name, force=force)

    def _create(self, name: str, *, force: bool) -> Keypair:
        _make_private_dir(self.state_dir)
        _make_private_dir(self.trusted_dir)
        public, secret = (k.decode("ascii") for k in zmq.curve_keypair())
        try:
            # Two peers sharing a folder may start together: one key wins.
            _write_atomic(
                self.secret_file, _certificate_text(public, secret, name), 0o600, replace=force
            )
            _write_atomic(self.public_file, _certificate_text(public, None, name), 0o644)
        except FileExistsError:
            return self.load()
        except OSError as exc:
            raise KeyFileError(f"cannot write keys in {self.state_dir}: {exc}") from exc
        self._own = public
        return Keypair(public, secret)

    def load(self) -> Keypair:
        """This peer's keypair; a clear error if missing, malformed or readable by others."""
        if not self.secret_file.exists():
            raise KeyFileError(f"no key in {self.state_dir}: run `ccied keys generate`")
        mode = self.secret_file.stat().st_mode & 0o777
        if mode & 0o077:
            raise KeyFileError(
                f"{self.secret_file} is readable by other users (mode {mode:o}): "
                f"run `chmod 600 {self.secret_file}`"
            )
        cert = read_certificate(self.secret_file)
        public, secret = cert.public, cert.secret
        if secret is None:
            raise KeyFileError(f"{self.secret_file} holds no secret-key")
        if zmq.curve_public(secret.encode()).decode("ascii") != public:
            raise KeyFileError(f"{self.secret_file}: the public key does not match the secret")
        self._own = public
        return Keypair(public, secret)

    def load_or_generate(self, name: str = "peer") -> tuple[Keypair, bool]:
        """(keypair, created): the first start of a peer makes its key."""
        if self.exists():
            return self.load(), False
        keypair = self._create(name, force=False)
        return keypair, True

    # -- allow-list -------------------------------------------------------------

    def trust(self, key: str, name: str | None = None) -> Path:
        """Add ``key`` to the allow-list as ``trusted/NAME.key``; returns the file."""
        check_key(key)
        label = name or f"key-{z85.decode(key).hex()[:12]}"
        if not _NAME_RE.fullmatch(label):
            raise KeyFileError(f"name {label!r}: use letters, digits, '.', '_' or '-'")
        _make_private_dir(self.trusted_dir)
        path = self.trusted_dir / f"{label}.key"
        if path.exists():
            if read_certificate(path).public != key:
                raise KeyFileError(f"{path} already trusts another key; pick another --name")
            return path
        _write_atomic(path, _certificate_text(key, None, label), 0o644)
        return path

    def trust_file(self, path: Path, name: str | None = None) -> tuple[str, Path]:
        """Trust the public key in a peer's certificate file (never its secret)."""
        cert = read_certificate(path)
        if cert.secret is not None:
            raise KeyFileError(
                f"{path} is a SECRET certificate: give peers the public one ({IDENTITY}.key)"
            )
        stem = path.stem if _NAME_RE.fullmatch(path.stem) and path.stem != IDENTITY else None
        return cert.public, self.trust(cert.public, name or cert.name or stem)

    def untrust(self, key_or_name: str) -> list[Path]:
        """Remove every trusted file for this key or name; returns what went."""
        removed = []
        for name, key in self.trusted().items():
            if key_or_name in (name, key):
                path = self.trusted_dir / f"{name}.key"
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def trusted(self) -> dict[str, str]:
        """{name: key} of the allow-list; bad files are skipped with their reason logged."""
        with self._lock:
            try:
                st = self.trusted_dir.stat()
                seen = (st.st_mtime_ns, st.st_ino)
            except FileNotFoundError:
                self._trusted, self._seen = {}, None
                return {}
            if seen != self._seen:
                self._trusted = self._read_trusted()
                self._seen = seen
            return dict(self._trusted)

    def is_trusted(self, key: str) -> bool:
        """True for this peer's own key and every key in ``trusted/``."""
        if self._own is not None and key == self._own:
            return True
        return key in self.trusted().values()

    def _read_trusted(self) -> dict[str, str]:
        found = {}
        for path in sorted(self.trusted_dir.glob("*.key")):
            try:
                found[path.stem] = read_certificate(path).public
            except KeyFileError as exc:
                log.warning("ignoring trusted key file: %s", exc)
        return found


def split_keyed_address(text: str) -> tuple[str, str | None]:
    """``KEY@tcp://host:port`` -> (address, KEY); a bare address -> (address, None).

    Z85 may itself contain ``@``, so the key is the 40 characters before the
    ``@`` that precedes the address's scheme.
    """
    if len(text) > KEY_CHARS and text[KEY_CHARS] == "@" and "://" in text[KEY_CHARS + 1 :]:
        return text[KEY_CHARS + 1 :], check_key(text[:KEY_CHARS], f"the key in {text!r}")
    return text, None
