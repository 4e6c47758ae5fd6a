"""A real XRootD server for the tests: ``root://`` and, through XrdHttp on the same port, ``https://``.

The Debian ``xrootd-server`` daemon binds every interface and has no option to bind one address, so it runs in
a network namespace of its own (nothing outside this machine, or even outside the namespace, can reach it),
and a small forwarder in the test process listens on ``127.0.0.1:<free port>`` and connects into the namespace
for every client connection. XRootD refuses to run as root, so it is started as the ``xrootd`` user; the TLS
certificate for XrdHttp is a self-signed one made with ``openssl`` for ``127.0.0.1``.

:meth:`XRootDServer.stop` / :meth:`XRootDServer.start` kill and restart the daemon (same port, same files):
what a client sees when a facility's server goes away in the middle of a run.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


class ServerUnavailable(RuntimeError):
    """Why the server cannot run on this machine (the tests skip with this message)."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _new_netns() -> int:
    """A fresh network namespace with its loopback up; returns an fd that keeps it alive.

    ``unshare`` runs in a short-lived thread, so only that thread (never the test process) changes namespace.
    """
    out: dict[str, object] = {}

    def target() -> None:
        try:
            if _libc().unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                ifr = struct.pack("16sH22x", b"lo", 0)
                flags = struct.unpack("16sH22x", fcntl.ioctl(s, _SIOCGIFFLAGS, ifr))[1]
                fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))
            out["fd"] = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        except OSError as err:
            out["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in out:
        raise ServerUnavailable(f"cannot create a network namespace for the server ({out['error']})")
    fd = out["fd"]
    assert isinstance(fd, int)
    return fd


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) for ``127.0.0.1`` / ``localhost``, valid for two days."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ServerUnavailable("openssl not found (apt-get install openssl)")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


class _Forwarder:
    """``127.0.0.1:port`` here -> ``127.0.0.1:port`` inside the server's namespace, byte for byte."""

    def __init__(self, netns_fd: int) -> None:
        self._netns_fd = netns_fd
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="xrootd-forwarder", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            _setns(self._netns_fd)  # this thread only
            upstream = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            upstream.settimeout(None)
        except OSError:
            # what a client sees from a dead server: the connection is reset
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        with self._lock:
            if self._closed:
                client.close()
                upstream.close()
                return
            self._open.update((client, upstream))
        pump = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        pump.start()
        self._pump(client, upstream)
        pump.join()
        with self._lock:
            self._open.difference_update((client, upstream))
        client.close()
        upstream.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def drop_connections(self) -> None:
        """Reset every open connection (the server side went away)."""
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.drop_connections()
        self._listener.close()


class XRootDServer:
    """An ``xrootd`` daemon serving ``data_dir`` as ``/store`` on 127.0.0.1 (root:// and https://)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        binary = shutil.which("xrootd")
        if binary is None:
            raise ServerUnavailable("xrootd not found (apt-get install xrootd-server)")
        self._binary = binary
        if os.geteuid() != 0:
            raise ServerUnavailable("the server runs in its own network namespace and as the xrootd user: needs root")
        self._setpriv = shutil.which("setpriv")
        if self._setpriv is None:
            raise ServerUnavailable("setpriv not found (util-linux)")
        try:
            import pwd

            pwd.getpwnam("xrootd")
        except KeyError:
            raise ServerUnavailable("no xrootd user (it comes with the xrootd-server package)") from None
        # a world-readable tree outside pytest's private (0700) temporary folders, for the xrootd user
        self.root = Path(tempfile.mkdtemp(prefix="agc-sx-xrootd-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        (self.data / "store").mkdir(parents=True)
        self._run = self.root / "run"
        self._run.mkdir()
        shutil.chown(self._run, "xrootd", "xrootd")
        self.cert, self.key = self_signed_certificate(self.root)
        shutil.chown(self.key, "xrootd", "xrootd")
        self._netns = _new_netns()
        self._forwarder = _Forwarder(self._netns)
        self.port = self._forwarder.port
        self.log = self._run / "xrootd.log"
        self._config = self.root / "xrootd.cfg"
        self._config.write_text(
            "all.export /store\n"
            f"oss.localroot {self.data}\n"
            f"all.adminpath {self._run}\n"
            f"all.pidpath {self._run}\n"
            f"xrd.tls {self.cert} {self.key}\n"
            f"xrd.tlsca certfile {self.cert}\n"
            f"xrd.protocol XrdHttp:{self.port} libXrdHttp.so\n"
        )
        self._process: subprocess.Popen[bytes] | None = None

    # --- files -------------------------------------------------------------------------------------------------

    def add(self, source: Path, name: str) -> str:
        """Serve ``source`` as ``/store/<name>``; returns that path."""
        target = self.data / "store" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        for parent in [target.parent, *target.parent.parents]:
            if parent == self.root:
                break
            parent.chmod(0o755)
        shutil.copyfile(source, target)
        target.chmod(0o644)
        return f"/store/{name}"

    def root_url(self, path: str) -> str:
        return f"root://127.0.0.1:{self.port}/{path}"

    def https_url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}/{path}"

    # --- the daemon --------------------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the daemon (again) and wait until it accepts connections."""
        if self._process is not None and self._process.poll() is None:
            return
        netns = self._netns
        log = open(self._run / "stdout.log", "ab")  # noqa: SIM115 (the daemon keeps it)
        self._process = subprocess.Popen(
            [str(self._setpriv), "--reuid=xrootd", "--regid=xrootd", "--init-groups", self._binary,
             "-c", str(self._config), "-p", str(self.port), "-l", str(self.log)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, pass_fds=(netns,),
            preexec_fn=lambda: _setns(netns), cwd=self._run,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerUnavailable(f"xrootd exited with {self._process.returncode}: {self.log_tail()}")
            if self._listening():
                return
            time.sleep(0.1)
        self.stop()
        raise ServerUnavailable(f"xrootd did not start within {timeout:.0f} s: {self.log_tail()}")

    def _listening(self) -> bool:
        out: dict[str, bool] = {}

        def probe() -> None:
            _setns(self._netns)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                out["ok"] = True
            except OSError:
                out["ok"] = False

        thread = threading.Thread(target=probe)
        thread.start()
        thread.join()
        return out.get("ok", False)

    def stop(self) -> None:
        """Kill the daemon at once (no goodbye to the clients) and reset their connections."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)
        self._forwarder.drop_connections()

    def log_tail(self, lines: int = 5) -> str:
        texts = []
        for p in (self._run / "stdout.log", self.log):
            if p.exists():
                texts += p.read_text(errors="replace").splitlines()
        return " | ".join(texts[-lines:])

    def close(self) -> None:
        self.stop()
        self._forwarder.close()
        os.close(self._netns)
        shutil.rmtree(self.root, ignore_errors=True)
