"""The composition root: builds the server from its parts and owns their lifecycle.

engines (one per served model) -> one batcher (with the lanes' admission) -> core -> the
front-ends (gRPC always, HTTP on request), all on one event loop. Nothing below this module
knows how the others are put together: the front-ends are adapters over the core, and neither
imports the other.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Sequence

from .admission import Admission
from .batcher import Batcher
from .budget import MemoryBudget
from .core import Core, warm_up
from .jobs import INTERACTIVE, LANES
from .engine import Engine
from .limits import Limits
from .metrics import Metrics
from .security import Security
from .service import SERVICE_NAME, GrpcFrontEnd

log = logging.getLogger("bertstream.app")

HEALTH_CHECK_S = 0.5


@dataclass
class RunningServer:
    grpc: GrpcFrontEnd
    port: int
    batcher: Batcher
    admissions: dict[str, Admission]  # lane -> its room in the queue
    budget: MemoryBudget
    watch: asyncio.Task | None = None  # keeps health current, from the warm-up on
    http: object = None  # the HTTP front-end's server, when there is one
    http_port: int | None = None
    warmed: bool = False
    stopping: bool = False

    @property
    def admission(self) -> Admission:
        """The interactive lane's room (where unary calls, Tokenize and HTTP wait)."""
        return self.admissions[INTERACTIVE]

    def serving(self, engine: Engine | None = None) -> bool:
        """Warmed up, healthy (every model, or that one) and not stopping (HTTP /health; gRPC
        health says the same)."""
        return self.warmed and not self.stopping and self.batcher.healthy(engine)

    async def stop(self, grace: float) -> None:
        """Health NOT_SERVING, refuse new calls, give calls in flight `grace` seconds, then
        finish the batcher's work and stop its threads."""
        self.stopping = True
        if self.watch is not None:
            self.watch.cancel()
        if self.http is not None:
            self.http.config.timeout_graceful_shutdown = grace
            self.http.should_exit = True
        await self.grpc.stop(grace)
        if self.http is not None:
            await self.http.task
        self.budget.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.close)

    async def watch_health(self) -> None:
        """Each model SERVING while the batcher is healthy for it (every forward worker alive,
        its passes not failing one after another), the whole server while every model is;
        NOT_SERVING otherwise, so probes and balancers move traffic away."""
        serving: dict = {}
        while True:
            now = {engine.name: self.batcher.healthy(engine) for engine in self.batcher.engines}
            now[""] = all(now.values())
            if now != serving:
                await self.grpc.set_serving(now)
                for name, healthy in now.items():
                    if name in serving and serving[name] != healthy:
                        log.warning("health of %s: %s", name or "the server",
                                    "SERVING" if healthy else "NOT_SERVING (forward workers "
                                    "died or its forward passes keep failing)")
                serving = now
            await asyncio.sleep(HEALTH_CHECK_S)


async def start_server(engines: Engine | Sequence[Engine], limits: Limits,
                       host: str = "127.0.0.1", port: int = 50051,
                       security: Security = Security(), http_port: int | None = None,
                       http_metrics: bool = False) -> RunningServer:
    """Serve the models (the first is the default) over gRPC (port 0: any free port, see .port)
    and, with http_port, HTTP on the same core and loop. Health says NOT_SERVING (HTTP /health
    503) until a warm-up text has gone through each model. batcher.metrics holds the Prometheus
    registry."""
    engines = list(engines) if isinstance(engines, (list, tuple)) else [engines]
    names = [engine.name for engine in engines]
    if any(name in ("", SERVICE_NAME) for name in names):
        raise ValueError(f"a model may not be called {SERVICE_NAME!r} or nothing (the whole "
                         f"server's health names): name it (--model NAME=PATH)")
    if len(set(names)) < len(names):
        raise ValueError(f"two models have one name: {', '.join(names)}; name them "
                         f"(--model NAME=PATH)")
    metrics = Metrics()
    for engine in engines:
        metrics.model.labels(engine.name).info({
            "path": engine.model_name, "device": str(engine.device), "dtype": engine.dtype,
            "max_length": str(engine.max_length), "weight_bytes": str(engine.weight_bytes)})
    loop = asyncio.get_running_loop()
    admissions = {lane: Admission(limits.max_queue_texts, loop) for lane in LANES}
    batcher = Batcher(engines, limits.max_batch_tokens, metrics,
                      on_leave=lambda lane, texts: admissions[lane].release(texts),
                      bulk_share=limits.bulk_share)
    core = Core(engines, batcher, limits, admissions)
    budget = MemoryBudget(limits.max_held_bytes, limits.max_connection_held_bytes,
                          limits.stall_timeout_s)
    front = GrpcFrontEnd(core, budget, security)
    await front.start(host, port)
    running = RunningServer(front, front.port, batcher, admissions, budget)
    if http_port is not None:
        from .http import create_app, start_http  # FastAPI only when asked

        app = create_app(core, running.serving, budget, list(security.auth_tokens),
                         security.health_open, metrics=http_metrics)
        running.http = await start_http(
            app, host, http_port, limits.max_message_bytes, limits.max_texts_per_request,
            budget, lambda: running.stopping, security.tls_cert, security.tls_key,
            security.tls_client_ca, limits.http_read_timeout_s, limits.max_http_connections)
        running.http_port = running.http.servers[0].sockets[0].getsockname()[1]
    await warm_up(core)
    running.warmed = True
    running.watch = asyncio.ensure_future(running.watch_health())
    return running
