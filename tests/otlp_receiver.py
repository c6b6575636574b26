"""A minimal OTLP/HTTP trace receiver on 127.0.0.1: records each export's resource
attributes, for what Phoenix's span API does not show (`service.instance.id`)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class OtlpReceiver:
    """`with OtlpReceiver() as r:` takes OTLP/HTTP protobuf exports at `r.url/v1/traces`."""

    def __init__(self) -> None:
        self.resources: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    for spans in request.resource_spans:
                        receiver.resources.append(
                            {a.key: a.value.string_value for a in spans.resource.attributes}
                        )
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def instances(self) -> set[str]:
        with self.lock:
            return {r.get("service.instance.id", "") for r in self.resources}

    def service_names(self) -> set[str]:
        with self.lock:
            return {r.get("service.name", "") for r in self.resources}

    def wait_for_instances(self, count: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.instances()) >= count:
                return True
            time.sleep(0.1)
        return False

    def __enter__(self) -> OtlpReceiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
