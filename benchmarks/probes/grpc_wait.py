"""Probe: what gRPC itself costs a unary call whose handler waits on another thread, as Embed
waits on a forward worker: Info made to wait WAIT seconds for a background thread (sleeping or
spinning) before it answers, against Embed of one short text. Both p50 of 200 calls, client and
server in separate processes, as in production.

    python benchmarks/probes/grpc_wait.py [--dtype float32]

Prints, for each wait, Info's p50 minus the wait; and Embed's p50 minus the server's queue and
compute time (usage), and minus the time inside the servicer too.
"""
import argparse
import asyncio
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import free_port  # noqa: E402

SHORT = "The quick brown fox jumps over the lazy dog."


def serve(port: int, dtype: str) -> None:
    """A real server whose Info first waits for a background thread (WAIT env: seconds; a
    negative value spins instead of sleeping); prints the servicer's Embed p50 on SIGUSR1."""
    from bertstream.server import service
    from bertstream.server.cli import main

    wake, inside = queue.Queue(), []

    def waker():
        while True:
            loop, future, seconds = wake.get()
            if seconds < 0:
                end = time.perf_counter() - seconds
                while time.perf_counter() < end:
                    pass
            else:
                time.sleep(seconds)
            loop.call_soon_threadsafe(future.set_result, None)

    threading.Thread(target=waker, daemon=True).start()
    info, embed = service.EmbedderService.Info, service.EmbedderService.Embed

    async def waiting_info(self, request, context):
        seconds = float(os.environ.get("WAIT", "0"))
        if os.environ.get("ON_LOOP"):  # no hand-off: the event loop's own thread waits
            end = time.perf_counter() + abs(seconds)
            while time.perf_counter() < end:
                if seconds > 0:
                    time.sleep(end - time.perf_counter())
        else:
            future = asyncio.get_running_loop().create_future()
            wake.put((asyncio.get_running_loop(), future, seconds))
            await future
        return await info(self, request, context)

    async def timed_embed(self, request, context):
        start = time.perf_counter()
        response = await embed(self, request, context)
        inside.append(time.perf_counter() - start)
        return response

    service.EmbedderService.Info, service.EmbedderService.Embed = waiting_info, timed_embed
    signal.signal(signal.SIGUSR1, lambda *_: (print(statistics.median(inside[10:]), flush=True),
                                              os._exit(0)))
    sys.argv = ["bertstream", "serve", "--port", str(port), "--log-level", "WARNING",
                "--dtype", dtype]
    main()


def p50(fn, repeat=200) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.dtype)
    from bertstream.client import Client

    for wait, on_loop in ((0.0, ""), (0.000001, ""), (0.010, ""), (-0.010, ""), (0.010, "1"),
                          (-0.010, "1")):
        port = free_port()
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--dtype",
                                   args.dtype], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "WAIT": str(wait),
                                       "ON_LOOP": on_loop})
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            for _ in range(360):
                try:
                    client.embed([SHORT])
                    break
                except Exception:
                    time.sleep(0.5)
            info = p50(client.info) - abs(wait)
            work = []

            def embed():
                client.embed([SHORT])
                work.append((client.last_usage.queue_ns + client.last_usage.compute_ns) / 1e9)

            total = p50(embed)
        server.send_signal(signal.SIGUSR1)
        inside = float(server.stdout.readline())
        server.wait()
        how = "spinning" if wait < 0 else "sleeping"
        whose = "on the event loop" if on_loop else f"for a {how} thread"
        print(f"Info {how if on_loop else 'waiting'} {abs(wait) * 1e3:g} ms {whose}: +{info * 1e3:.2f} ms; "
              f"Embed: {total * 1e3:.2f} ms, minus queue and compute {(total - statistics.median(work)) * 1e3:.2f} ms, "
              f"minus the time in the servicer {(total - inside) * 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
