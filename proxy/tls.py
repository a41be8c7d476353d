"""TLS on the proxy's listeners and links: contexts built from PEM files, the handshake a connection makes
before anything else, and the certificates a SIGHUP loads again.

A TLS listener accepts an SSLStream whose handshake has not begun (TlsListener), so that the cheap checks
(a client's address against `allow`) come first and the handshake runs in the connection's own task,
under tls_handshake_timeout: a peer that stalls it holds no accept loop, no lock and no client slot.
"""

from __future__ import annotations

import os
import re
import ssl
import stat
import string
import weakref
from collections.abc import Iterable

import trio
from loguru import logger

from proxy.config import TlsFiles

# A closing TLS connection waits this long for its peer to take the goodbye (close_notify).
CLOSE_LINGER = 1.0
# The largest certificate, key or CA file loaded: a chain is a few KiB, a system CA bundle a few hundred.
# OpenSSL reads a file whole and synchronously; a bound keeps a wrong path from holding the event loop.
MAX_PEM_FILE = 4 << 20
# Names in certificates match the allowed ones whatever their ASCII case, and only that: Unicode case
# folding would let look-alikes in ("\u212aiosk", with a KELVIN SIGN, folds to "kiosk").
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


class TlsError(Exception):
    """A certificate, key or CA file cannot be used; the message names the file and says why, and
    `path` is that file ("" when it is a certificate and key that do not fit together)."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class HandshakeFailed(Exception):
    """A client's TLS handshake failed, timed out, or showed a certificate whose name is not allowed."""


class ServerContext(ssl.SSLContext):
    """A server's SSLContext that also carries the rest of its listener's policy: the client names it
    lets in (empty: any certificate the CA signed) and how long a handshake may take."""

    client_names: frozenset[str] = frozenset()
    handshake_timeout: float = 10.0


def server_context(files: TlsFiles, handshake_timeout: float) -> ServerContext:
    """A context serving `files.cert`, that asks for and verifies client certificates when
    `files.client_ca` is set. TLS 1.2 at least; the standard library's defaults otherwise.

    Error handling: TlsError naming the file that cannot be read or does not fit (a key of another
    certificate, a CA file with no certificate in it).
    """
    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, files.cert, files.key)
    if files.client_ca:
        _load_ca(context, files.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    context.client_names = frozenset(name.translate(_ASCII_LOWER) for name in files.client_names)
    context.handshake_timeout = handshake_timeout
    return context


def client_context(ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext:
    """A context for connecting to a TLS device: its certificate verified against `ca` (the system's
    CAs when empty) and its host name checked; `cert` and `key` are this side's client certificate.

    Error handling: TlsError naming the file, as server_context().
    """
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        _load_ca(context, ca)
    if cert:
        _load_chain(context, cert, key)
    return context


def _check_file(path: str) -> None:
    """TlsError unless `path` is a regular file of at most MAX_PEM_FILE bytes: a FIFO, a device such as
    /dev/zero, a directory or a huge file would block or bloat the synchronous load that follows."""
    try:
        found = os.stat(path)
    except OSError as exc:
        raise TlsError(f"cannot read {path}: {exc.strerror or exc}", path) from None
    if not stat.S_ISREG(found.st_mode):
        raise TlsError(f"cannot read {path}: not a regular file", path)
    if found.st_size > MAX_PEM_FILE:
        too_big = f"{path}: {found.st_size} bytes, too big for a PEM file (at most {MAX_PEM_FILE >> 20} MiB)"
        raise TlsError(too_big, path)


def _load_chain(context: ssl.SSLContext, cert: str, key: str) -> None:
    for path in (cert, key) if key else (cert,):
        _check_file(path)
    try:
        context.load_cert_chain(cert, key or None)
    except ssl.SSLError as exc:  # an OSError too: first
        raise TlsError(f"{cert} with key {key or cert}: not a PEM certificate and its key ({_reason(exc)})") from None
    except OSError as exc:
        # A missing or unreadable file: say which of the two.
        path = exc.filename or (cert if not key else f"{cert} or {key}")
        raise TlsError(f"cannot read {path}: {exc.strerror or exc}", path) from None


def _load_ca(context: ssl.SSLContext, ca: str) -> None:
    _check_file(ca)
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:  # an OSError too: first
        raise TlsError(f"{ca}: not a PEM CA certificate ({_reason(exc)})", ca) from None
    except OSError as exc:
        raise TlsError(f"cannot read {ca}: {exc.strerror or exc}", ca) from None


def _reason(exc: ssl.SSLError) -> str:
    """What OpenSSL said, without its source line: "key values mismatch", "certificate verify failed:
    certificate has expired"."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if exc.reason:
        return exc.reason.replace("_", " ").lower()
    # "[SSL] PEM lib (_ssl.c:3926)" -> "PEM lib"
    return re.sub(r"^\[\w+\]\s*|\s*\(_ssl\.c:\d+\)$", "", exc.strerror or str(exc))


async def handshake(stream: trio.SSLStream) -> None:
    """Completes the server side of `stream`'s handshake within its context's handshake_timeout, and
    checks the client's certificate against the allowed names.

    Resource handling: the caller closes `stream` whatever happens. Error handling: HandshakeFailed with
    the reason in an operator's words (the TLS alert, a timeout, a name not allowed).
    """
    context = stream.context
    assert isinstance(context, ServerContext)
    try:
        with trio.fail_after(context.handshake_timeout):
            await stream.do_handshake()
    except trio.TooSlowError:
        raise HandshakeFailed(f"no handshake within tls_handshake_timeout = {context.handshake_timeout:g} s") from None
    except trio.BrokenResourceError as exc:
        raise HandshakeFailed(failure(exc)) from None
    names = certificate_names(stream.getpeercert() or {})
    if not allowed(context, names):
        shown = ", ".join(names) or "none"
        raise HandshakeFailed(f"certificate names ({shown}) are not in tls_client_names")


def allowed(context: ServerContext, names: Iterable[str]) -> bool:
    """Whether a client certificate with these names may in: any name when the listener allows any,
    else one of them equal to an allowed name but for ASCII case. A wildcard is a name, not a pattern."""
    if not context.client_names:
        return True
    return not context.client_names.isdisjoint(name.translate(_ASCII_LOWER) for name in names)


def failure(exc: trio.BrokenResourceError) -> str:
    """Why a handshake broke its stream, from the TLS error or the connection's end under it."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        return _reason(cause)
    return str(cause or exc) or "the connection closed"


def certificate_names(certificate: dict) -> list[str]:
    """The subject common names and DNS alternative names of a certificate (as getpeercert() gives it)."""
    common = [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
    dns = [value for kind, value in certificate.get("subjectAltName", ()) if kind == "DNS"]
    return common + dns


class ServerCredentials:
    """The current context of every listener that serves one set of files: reload() loads the files
    again for the connections that come next; connections made before keep their sessions."""

    def __init__(self, files: TlsFiles, handshake_timeout: float) -> None:
        self.files = files
        self._timeout = handshake_timeout
        self.context = server_context(files, handshake_timeout)

    def reload(self) -> None:
        """Loads the files again. Error handling: TlsError, and the previous context stays."""
        self.context = server_context(self.files, self._timeout)


class Credentials:
    """The ServerCredentials in use, one for each set of files, however many listeners serve it (ten
    thousand dial-in direct ports share one), and reload() for SIGHUP.

    Only credentials some listener still holds are kept: those of a stopped device are forgotten.
    """

    def __init__(self, handshake_timeout: float) -> None:
        self.handshake_timeout = handshake_timeout
        self._in_use: weakref.WeakValueDictionary[TlsFiles, ServerCredentials] = weakref.WeakValueDictionary()

    def server(self, files: TlsFiles) -> ServerCredentials:
        """The credentials for `files`, loaded now if no listener holds them. Error handling: TlsError."""
        credentials = self._in_use.get(files)
        if credentials is None:
            credentials = self._in_use[files] = ServerCredentials(files, self.handshake_timeout)
        return credentials

    def reload(self) -> None:
        """Loads every certificate in use again; one that fails is logged and its previous one serves on."""
        for credentials in list(self._in_use.values()):
            try:
                credentials.reload()
            except TlsError as exc:
                logger.error("SIGHUP: {}; the certificate loaded before stays in use", exc)


class TlsListener(trio.abc.Listener[trio.SSLStream]):
    """A TCP listener whose connections speak TLS, with the credentials current at each accept.

    accept() does no I/O beyond the TCP accept: the handshake is the connection's handler's, through
    handshake(). Resource handling: aclose() closes the TCP listener.
    """

    def __init__(self, transport: trio.SocketListener, credentials: ServerCredentials) -> None:
        self.transport = transport
        self.credentials = credentials

    @property
    def socket(self) -> trio.socket.SocketType:
        return self.transport.socket

    async def accept(self) -> trio.SSLStream:
        stream = await self.transport.accept()
        return trio.SSLStream(stream, self.credentials.context, server_side=True)

    async def aclose(self) -> None:
        await self.transport.aclose()


async def aclose(stream: trio.abc.Stream) -> None:
    """Closes `stream`. A TLS stream whose handshake completed sends its goodbye (close_notify) if the
    peer takes it within CLOSE_LINGER; one that never completed its handshake is closed at once (trio's
    own aclose would make the handshake first, for a peer that may be refused or stalled)."""
    if isinstance(stream, trio.SSLStream) and not _handshake_done(stream):
        await trio.aclose_forcefully(stream)
        return
    with trio.move_on_after(CLOSE_LINGER):
        # Cancelled, an SSLStream closes its TCP connection at once.
        await stream.aclose()


def _handshake_done(stream: trio.SSLStream) -> bool:
    try:
        stream.version()
    except trio.NeedHandshakeError:
        return False
    return True
