"""Probe: what this machine charges a round trip between two processes when one side waits
WAIT ms before it answers, with no gRPC and no Python objects in the way: a TCP ping-pong, the
server sleeping or spinning through the wait, the client blocking in recv() or polling for the
answer. p50 of 300 round trips minus the wait, one pair of processes per case.

    python benchmarks/probes/wake_cost.py

A round trip whose sides both stay awake is what the in-process baseline pays (nothing); the
gap between a sleeping and a spinning side is what a core waking from idle costs, whatever the
server is made of.
"""
import socket
import statistics
import subprocess
import sys
import time

WAIT = 0.010
ROUNDS = 300


def serve(port: int, spin: bool, wait: float) -> None:
    listener = socket.create_server(("127.0.0.1", port))
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while connection.recv(1):
        end = time.perf_counter() + wait
        if spin:
            while time.perf_counter() < end:
                pass
        elif wait:
            time.sleep(wait)
        connection.sendall(b"x")


def round_trip(port: int, poll: bool, wait: float) -> float:
    connection = socket.create_connection(("127.0.0.1", port))
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connection.setblocking(not poll)
    times = []
    for _ in range(ROUNDS + 10):
        start = time.perf_counter()
        connection.sendall(b"x")
        while True:
            try:
                if connection.recv(1):
                    break
            except BlockingIOError:
                pass
        times.append(time.perf_counter() - start - wait)
    connection.close()
    return statistics.median(times[10:])


def main():
    if len(sys.argv) > 1:
        return serve(int(sys.argv[1]), sys.argv[2] == "spin", float(sys.argv[3]))
    for wait in (0.0, WAIT):
        for server_side in ("sleep", "spin"):
            for poll in (False, True):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    port = probe.getsockname()[1]
                server = subprocess.Popen([sys.executable, __file__, str(port), server_side,
                                           str(wait)])
                for _ in range(100):
                    try:
                        extra = round_trip(port, poll, wait)
                        break
                    except ConnectionRefusedError:
                        time.sleep(0.05)
                server.wait()
                client = "polling" if poll else "blocking in recv"
                print(f"wait {wait * 1e3:g} ms, server {server_side:5}, client {client:16}: "
                      f"+{extra * 1e3:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
