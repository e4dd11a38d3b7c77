"""Prometheus metrics (prometheus-client), one registry per server so several can share a process.

What a request or a forward pass did is labelled by the served model's name (`model`); the queue's
gauges and the lanes' figures are the one scheduler's, across models."""

from __future__ import annotations

import prometheus_client as prom

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    def __init__(self):
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter(
            "bertstream_requests",
            "Requests (stream messages count one each) by RPC, status and model",
            ["rpc", "code", "model"], registry=r)
        self.texts = prom.Counter(
            "bertstream_texts", "Texts received by RPC, status and model", ["rpc", "code", "model"],
            registry=r)
        self.tokens = prom.Counter(
            "bertstream_tokens", "Real tokens embedded ([CLS]/[SEP] included)", ["model"],
            registry=r)
        self.truncated = prom.Counter(
            "bertstream_truncated_texts", "Texts cut to the max input length", ["model"],
            registry=r)
        self.latency = prom.Histogram(
            "bertstream_request_latency_seconds",
            "Request latency, arrival to response, by RPC and model",
            ["rpc", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.streams_open = prom.Gauge(
            "bertstream_streams_open", "EmbedStream calls in progress", registry=r)
        self.queue_depth = prom.Gauge(
            "bertstream_queue_texts", "Texts waiting for a forward pass", registry=r)
        self.queue_wait = prom.Histogram(
            "bertstream_queue_wait_seconds", "Per forward pass, how long its longest-waiting "
            "text waited for it",
            buckets=LATENCY_BUCKETS, registry=r)
        self.lane_queue_texts = prom.Gauge(
            "bertstream_lane_queue_texts", "Texts waiting for a forward pass, by lane", ["lane"],
            registry=r)
        self.lane_queue_wait = prom.Histogram(
            "bertstream_lane_queue_wait_seconds", "Per forward pass, how long its "
            "longest-waiting text waited for it, by lane", ["lane"], buckets=LATENCY_BUCKETS, registry=r)
        self.lane_batches = prom.Counter(
            "bertstream_lane_batches", "Forward passes, by the lane they served", ["lane"],
            registry=r)
        self.batch_rows = prom.Histogram(
            "bertstream_batch_size", "Texts per forward pass", ["model"], buckets=ROW_BUCKETS,
            registry=r)
        self.batch_tokens = prom.Histogram(
            "bertstream_batch_tokens", "Padded tokens per forward pass (rows x longest)", ["model"],
            buckets=TOKEN_BUCKETS, registry=r)
        # rate() of these gives achieved FLOP/s and the padding share, on any device.
        self.forward_flops = prom.Counter(
            "bertstream_forward_flops", "Floating-point operations of the forward passes, by the "
            "formula Info's forward_flops names (padded tokens counted)", ["model"], registry=r)
        self.real_tokens = prom.Counter(
            "bertstream_forward_real_tokens", "Real tokens in the forward passes", ["model"],
            registry=r)
        self.padded_tokens = prom.Counter(
            "bertstream_forward_padded_tokens", "Tokens computed in the forward passes, padding "
            "included (rows x longest)", ["model"], registry=r)
        self.forward_seconds = prom.Histogram(
            "bertstream_forward_seconds", "Forward pass time per batch", ["model"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.model = prom.Info("bertstream_model", "Each model served, by its name", ["model"],
                              registry=r)

    def serve_http(self, port: int, host: str = "127.0.0.1"):
        """Expose /metrics on host:port; returns the HTTP server (shutdown() stops it)."""
        server, _thread = prom.start_http_server(port, addr=host, registry=self.registry)
        return server
