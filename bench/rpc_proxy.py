"""A TCP relay on 127.0.0.1 in front of one rpc-server: adds a round-trip delay and counts
round trips, to measure bridge over RPC as if the worker sat on a network (not a test).

    python -m bench.rpc_proxy --listen PORT --to PORT [--rtt-ms 2] [--count FILE]

This machine's kernel has no ``sch_netem``, so ``tc qdisc ... netem delay`` cannot add
latency to the loopback device; this relay does it in user space. Every chunk is held for
half the round trip in each direction, counted from when it arrived (so the delay is a
link's latency, not a queue: chunks in flight overlap as on a real link). A round trip is
counted each time the worker answers after the client spoke: ggml-rpc sends commands
without replies (set_tensor, graph_compute) back to back, and waits only where it reads
something back, so this is the number of waits a step pays. The count goes to ``--count``
(a decimal number, rewritten in place).
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import time

from bench.common import arg_parser


class Counter:
    def __init__(self, path: str | None):
        self.n = 0
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC) if path else None

    def add(self) -> None:
        with self._lock:
            self.n += 1
            if self._fd is not None:
                os.pwrite(self._fd, f"{self.n:020d}".encode(), 0)


def pipe(src: socket.socket, dst: socket.socket, delay: float, on_first, on_close) -> None:
    """Forward src -> dst, each chunk ``delay`` seconds after it arrived."""
    q: collections.deque = collections.deque()
    ready = threading.Condition()
    done = [False]

    def writer() -> None:
        while True:
            with ready:
                while not q and not done[0]:
                    ready.wait()
                if not q:
                    break
                due, data = q.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                dst.sendall(data)
            except OSError:
                break
        on_close()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    while True:
        try:
            data = src.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            break
        on_first()
        with ready:
            q.append((time.monotonic() + delay, data))
            ready.notify()
    with ready:
        done[0] = True
        ready.notify()


def relay(listen: int, to: int, rtt: float, counter: Counter) -> None:
    srv = socket.create_server(("127.0.0.1", listen))
    while True:
        client, _ = srv.accept()
        try:
            worker = socket.create_connection(("127.0.0.1", to))
        except OSError:
            client.close()
            continue
        for s in (client, worker):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        last = ["c"]  # who spoke last: a worker reply after the client spoke is a round trip

        def from_client(last=last) -> None:
            last[0] = "c"

        def from_worker(last=last) -> None:
            if last[0] == "c":
                counter.add()
            last[0] = "w"

        def close(client=client, worker=worker) -> None:
            for s in (client, worker):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pipe, args=(client, worker, rtt / 2, from_client, close),
                         daemon=True).start()
        threading.Thread(target=pipe, args=(worker, client, rtt / 2, from_worker, close),
                         daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--to", type=int, required=True)
    ap.add_argument("--rtt-ms", type=float, default=0.0)
    ap.add_argument("--count", help="file the round-trip count is written to")
    args = ap.parse_args(argv)
    relay(args.listen, args.to, args.rtt_ms / 1e3, Counter(args.count))


if __name__ == "__main__":
    main()
