"""llama.cpp's RPC backend: a model's layers on ``rpc-server`` workers (``--rpc HOST:PORT,...``).

llama-cpp-python 0.3.36 has no ``rpc_servers`` argument any more; llama.cpp adds RPC devices
through its backend registry (``common/arg.cpp``'s ``add_rpc_devices``). This module does the
same through ctypes on the ggml libraries llama-cpp-python ships: the ``RPC`` registry's
``ggml_backend_rpc_add_server`` proc, called once per endpoint, returns a registry whose
devices are the worker's. Those devices are *not* registered globally: a model gets them
only through ``llama_model_params.devices`` (``RpcDevices.for_model``), so the target can
run on the workers while the draft stays on this machine.

ggml-rpc ends the process with ``abort()`` when a worker cannot be reached, answers with
another protocol version, or dies mid-command (``RPC_STATUS_ASSERT`` in ggml-rpc.cpp), and
its sockets have no timeouts. So, before llama.cpp connects, ``probe`` checks every
endpoint itself (connect and the HELLO handshake, with a timeout) and raises a one-line
``RpcError`` naming the endpoint; ``watch_aborts`` turns llama.cpp's abort message
into one line naming the workers that no longer answer; and ``Watchdog`` ends a decode that
waits on a worker longer than a timeout instead of hanging. Whoever owns the process (the
CLI) decides what a fatal error does: print and exit, or tell a supervisor.

The RPC protocol has no authentication: workers must sit on a trusted network.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from runtime.native import ABORT_CALLBACK, ggml_libs, local_accelerators

log = logging.getLogger(__name__)

# ggml-rpc.h / ggml-rpc.cpp of the llama.cpp llama-cpp-python 0.3.36 vendors; a test reads
# them from the sources rpc-server is built from, so a drift fails there, not silently.
RPC_PROTO_MAJOR = 7
RPC_PROTO_MINOR = 0
RPC_CMD_HELLO = 14
RPC_CONN_CAPS_SIZE = 24  # transport.h; all zeros: plain TCP, no RDMA upgrade
_HELLO_RSP = struct.Struct("<BBBB24s")  # major, minor, patch, padding, conn_caps



class RpcError(RuntimeError):
    """A worker that cannot serve: the message is one line and names the endpoint."""


@dataclass(frozen=True)
class Endpoint:
    """One ``rpc-server``: ``host:port`` as llama.cpp's ``--rpc`` takes it (IPv4 or a name)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def trusted(self) -> bool:
        """A loopback or private address (RFC 1918, link-local, ULA), or ``localhost``.
        Names other than localhost are not resolved here: they count as untrusted."""
        if self.host == "localhost":
            return True
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return ip.is_loopback or ip.is_private or ip.is_link_local


def parse_endpoints(text: str, option: str = "--rpc") -> tuple[Endpoint, ...]:
    """``HOST:PORT[,HOST:PORT...]`` -> endpoints; a ValueError names the bad item."""
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise ValueError(f"{option} expects HOST:PORT[,HOST:PORT...], got {text!r}")
    out: list[Endpoint] = []
    for item in items:
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{option}: {item!r} is not HOST:PORT with a port in 1..65535")
        if any(c.isspace() for c in host) or ":" in host or host.startswith("["):
            # ggml-rpc splits at the first ':' and connects over IPv4 only
            raise ValueError(f"{option}: {item!r}: the host must be an IPv4 address or a "
                             "name (llama.cpp's RPC client speaks IPv4 only)")
        ep = Endpoint(host, int(port))
        if ep in out:
            raise ValueError(f"{option}: {item} is given twice")
        out.append(ep)
    if len(out) > 16:  # GGML_RPC_MAX_SERVERS
        raise ValueError(f"{option}: at most 16 workers, got {len(out)}")
    return tuple(out)


def warn_untrusted(endpoints: Sequence[Endpoint]) -> None:
    """One warning line for workers outside loopback and private networks."""
    public = [str(e) for e in endpoints if not e.trusted]
    if public:
        log.warning("RPC workers %s are not on a loopback or private address: llama.cpp's RPC "
                    "protocol has no authentication or encryption, keep workers on a trusted "
                    "network", ", ".join(public))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("closed")
        buf += part
    return buf


def probe(ep: Endpoint, timeout: float = 5.0) -> tuple[int, int, int]:
    """Connect to ``ep`` and do ggml-rpc's HELLO handshake; returns the worker's protocol
    version. The worker then sees this connection close and waits for the next client.

    Raises:
        RpcError: down, refusing, silent past ``timeout``, or another protocol major
            version (or a newer minor one), in one line naming ``ep``.
    """
    what = f"RPC worker {ep}"
    try:
        sock = socket.create_connection((ep.host, ep.port), timeout=timeout)
    except TimeoutError:
        raise RpcError(f"{what} did not accept a connection within {timeout:g} s") from None
    except ConnectionRefusedError:
        raise RpcError(f"{what} refused the connection: is rpc-server running there "
                       f"(rpc-server -H HOST -p {ep.port})?") from None
    except OSError as e:
        raise RpcError(f"{what} cannot be reached: {e.strerror or e}") from None
    with sock:
        try:
            sock.sendall(struct.pack("<BQ", RPC_CMD_HELLO, RPC_CONN_CAPS_SIZE)
                         + bytes(RPC_CONN_CAPS_SIZE))
            (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
            if size != _HELLO_RSP.size:
                raise RpcError(f"{what} answered the handshake with {size} bytes, not "
                               f"{_HELLO_RSP.size}: it speaks another RPC protocol version "
                               f"than this llama.cpp ({RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}.x)")
            major, minor, patch, _, _ = _HELLO_RSP.unpack(_recv_exact(sock, size))
        except TimeoutError:
            raise RpcError(f"{what} accepted but did not answer the handshake within "
                           f"{timeout:g} s (busy with another client, or not an "
                           "rpc-server)") from None
        except (ConnectionError, OSError):
            raise RpcError(f"{what} closed the connection during the handshake: probably "
                           f"another RPC protocol version than this llama.cpp's "
                           f"{RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}.x, or not an rpc-server"
                           ) from None
    if major != RPC_PROTO_MAJOR or minor > RPC_PROTO_MINOR:
        raise RpcError(f"{what} speaks RPC protocol {major}.{minor}.{patch}, this llama.cpp "
                       f"{RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}.x: build rpc-server from the same "
                       "llama.cpp (python -m exporters.llamacpp_tools ggml-rpc-server)")
    return major, minor, patch


def refusing(endpoints: Sequence[Endpoint], timeout: float = 1.0) -> list[Endpoint]:
    """The endpoints that no longer accept a TCP connection (a killed worker, a closed
    port). Only a connect: a live worker serves one client at a time, so a handshake would
    wait behind this process's own connection."""
    gone = []
    for ep in endpoints:
        try:
            socket.create_connection((ep.host, ep.port), timeout=timeout).close()
        except OSError:
            gone.append(ep)
    return gone


# -- the ggml side ----------------------------------------------------------------------

_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)


def rpc_supported() -> bool:
    """True when this llama.cpp build has the RPC backend (``-DGGML_RPC=ON``)."""
    import llama_cpp

    registry = ggml_libs()[0].ggml_backend_reg_by_name(b"RPC")
    return bool(llama_cpp.llama_supports_rpc()) and bool(registry)


_added: set[Endpoint] = set()  # endpoints ggml-rpc has connected to in this process


class RpcDevices:
    """The ggml devices of some RPC workers, for ``llama_model_params.devices``.

    ggml keeps one connection per endpoint for the life of the process and never frees the
    registries ``add_server`` returns, so there is nothing to close here; this object owns
    the NULL-terminated array a model's params point into.

    Args:
        endpoints: the workers; each is probed first (``probe``), so a bad one fails with
            an ``RpcError`` naming it before llama.cpp would abort.
        timeout: seconds the probe waits for a connection and for the handshake.
    """

    def __init__(self, endpoints: Sequence[Endpoint], timeout: float = 5.0):
        if not endpoints:
            raise ValueError("RpcDevices needs at least one endpoint")
        if not rpc_supported():
            raise RpcError("this llama.cpp build has no RPC backend; rebuild it with "
                           "scripts/setup.sh (it adds -DGGML_RPC=ON unless BRIDGE_RPC=0)")
        self.endpoints = tuple(endpoints)
        warn_untrusted(self.endpoints)
        for ep in self.endpoints:
            # a worker serves one client at a time: once this process holds a connection
            # to it, a probe would wait behind that connection
            if ep not in _added:
                probe(ep, timeout)
        ggml, base = ggml_libs()
        reg = ggml.ggml_backend_reg_by_name(b"RPC")
        proc = base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
        if not proc:
            raise RpcError("this llama.cpp's RPC backend has no ggml_backend_rpc_add_server")
        add_server = _ADD_SERVER(proc)
        self.devices: list[int] = []
        for ep in self.endpoints:
            worker = add_server(str(ep).encode())
            _added.add(ep)
            n = base.ggml_backend_reg_dev_count(worker) if worker else 0
            if n == 0:
                raise RpcError(f"RPC worker {ep} offers no devices")
            self.devices += [base.ggml_backend_reg_dev_get(worker, i) for i in range(n)]
        log.info("RPC workers %s: devices %s", ", ".join(map(str, self.endpoints)),
                 ", ".join(base.ggml_backend_dev_name(d).decode() for d in self.devices))

    def for_model(self, params) -> ctypes.Array:
        """Point ``params.devices`` at this machine's GPUs (if any) and the workers' devices,
        as llama.cpp's ``--rpc`` would; ``-ngl`` then says how many layers go to them. The
        returned array must outlive the model load."""
        devs = local_accelerators() + self.devices
        arr = (ctypes.c_void_p * (len(devs) + 1))(*devs, None)
        params.devices = ctypes.cast(arr, ctypes.c_void_p)
        return arr


# -- fatal errors -----------------------------------------------------------------------

def _log_fatal(message: str) -> None:
    log.critical("%s", message)


_fatal: dict[str, object] = {"handler": _log_fatal, "endpoints": ()}


def set_fatal_handler(handler: Callable[[str], None]) -> None:
    """What a fatal RPC error does (the CLI's: print one line and ``os._exit``). It gets one
    line naming the workers; it runs on ggml-rpc's or the watchdog's thread, and if it
    returns, the process aborts (llama.cpp's own state is unusable by then). Default: log
    the line at CRITICAL."""
    _fatal["handler"] = handler


def _on_fatal(message: str) -> None:
    _fatal["handler"](message)  # type: ignore[operator]


def _fatal_abort(message: str) -> None:
    _on_fatal(message)
    os.abort()  # a running llama_decode cannot be interrupted: end rather than hang


def watch_aborts(endpoints: Sequence[Endpoint]) -> None:
    """Route llama.cpp's aborts (ggml-rpc aborts on a lost worker) through the fatal
    handler, as one line naming the workers that stopped accepting connections."""

    def on_abort(message: bytes) -> None:
        text = message.decode("utf-8", "replace").strip().splitlines()[0]
        text = text.split(": ", 1)[-1] if ".cpp:" in text else text  # drop file:line
        eps = list(_fatal["endpoints"])  # type: ignore[call-overload]
        gone = refusing(eps)
        for _ in range(20):  # a dying worker drops its connections before its listener
            if gone or not eps:
                break
            time.sleep(0.05)
            gone = refusing(eps)
        who = (f"RPC worker {', '.join(map(str, gone))} stopped answering" if gone else
               f"an RPC worker ({', '.join(map(str, eps))}) failed" if eps else
               "llama.cpp stopped")
        _on_fatal(f"{who} (llama.cpp: {text})")

    known = tuple(_fatal["endpoints"])  # type: ignore[call-overload]
    _fatal["endpoints"] = known + tuple(e for e in endpoints if e not in known)
    if "callback" not in _fatal:
        _fatal["callback"] = ABORT_CALLBACK(on_abort)  # kept alive for the life of the process
        ggml_libs()[1].ggml_set_abort_callback(_fatal["callback"])


class Watchdog:
    """Ends a decode that waits on the workers longer than ``timeout`` seconds: ggml-rpc's
    sockets have none, so a worker that hangs (or a machine that vanished without closing
    the connection) would block ``llama_decode`` for ever. It polls the contexts'
    ``busy_since`` (the monotonic time a ``llama_decode`` began, None when idle) and hands
    one line to the fatal handler; if that returns, the process aborts.

    Args:
        busy: callables returning the time the current decode began, or None.
        endpoints: the workers, named in the message.
        timeout: seconds; one decode of the longest batch must fit in it.
        fire: called with the line (default: the fatal handler, then ``os.abort()``).
    """

    def __init__(self, busy: Sequence[Callable[[], float | None]],
                 endpoints: Sequence[Endpoint], timeout: float,
                 fire: Callable[[str], None] | None = None):
        self._fire = fire or _fatal_abort
        self._busy = list(busy)
        self._endpoints = tuple(endpoints)
        self.timeout = timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rpc-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = min(1.0, self.timeout / 4)
        while not self._stop.wait(period):
            now = time.monotonic()
            if any(b is not None and now - b > self.timeout for b in (f() for f in self._busy)):
                gone = refusing(self._endpoints)
                who = ", ".join(map(str, gone or self._endpoints))
                self._fire(f"RPC worker {who} did not finish a decode within "
                           f"{self.timeout:g} s (--rpc-timeout)")
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
