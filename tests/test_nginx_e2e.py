"""Streaming through a real nginx (docs/http-api.md): `X-Accel-Buffering: no` makes nginx stream.

nginx runs as a non-daemon, single-process child with a config generated under tmp_path
(pid, logs and temp paths all there, so it runs as root or not). The chatd location keeps
nginx's DEFAULT buffering (`proxy_buffering` is not touched): chatd's
`X-Accel-Buffering: no` response header is what switches buffering off for its streams.

With nginx's defaults alone a small stream happens to trickle through even when buffered,
so a second pair of locations adds the common production setting `gzip on` for
text/event-stream: there, the location that honours the header streams, and a control
that ignores it (`proxy_ignore_headers X-Accel-Buffering`) holds the whole answer back to
the end — the header, not luck, is what makes the stream arrive incrementally.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import ANSWER, FakeUpstream
from tests.support import ChatdProcess, nginx_conf, provider_toml, running_nginx

USER = [{"role": "user", "content": "hi"}]

# The upstream and server blocks; support.nginx_conf wraps them in the rest.
NGINX_HTTP = """\
    upstream chatd {{
        server 127.0.0.1:{chatd_port};
    }}

    server {{
        listen 127.0.0.1:{port};

        # /v1/chat itself has no trailing slash, so the prefix is `/v1/chat` (a
        # `location /v1/chat/` would answer POST /v1/chat with a 301 to /v1/chat/).
        # Default buffering settings: no `proxy_buffering off` here.
        location /v1/chat {{
            proxy_pass http://chatd;
            proxy_http_version 1.1;
        }}

        # the same, with gzip on for event streams (a common production setting)
        location /gzip/ {{
            proxy_pass http://chatd/;
            proxy_http_version 1.1;
            gzip on;
            gzip_types text/event-stream;
        }}

        # control: as /gzip/, but deaf to chatd's X-Accel-Buffering header
        location /gzip-ignoring-header/ {{
            proxy_pass http://chatd/;
            proxy_http_version 1.1;
            gzip on;
            gzip_types text/event-stream;
            proxy_ignore_headers X-Accel-Buffering;
        }}
    }}
"""


@pytest.fixture(scope="module")
def chatd(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatdProcess]:
    config = "[chatd]\ntimeout_secs = 15\n\n" + provider_toml(
        "ollama", "ollama", fake.url, max_retries=0, cooldown_failures=0
    )
    with ChatdProcess(config, tmp_path_factory.mktemp("nginx-chatd")) as process:
        yield process


@pytest.fixture(scope="module")
def nginx(chatd: ChatdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real nginx in front of chatd; yields its base URL, stops it on the way out."""

    def config(tmp: Path, port: int) -> str:
        return nginx_conf(tmp, NGINX_HTTP.format(port=port, chatd_port=chatd.port))

    with running_nginx(tmp_path_factory.mktemp("nginx"), config) as url:
        yield url


Events = list[tuple[float, dict[str, Any]]]


def timed_stream(url: str, model: str, **headers: str) -> tuple[httpx.Headers, Events]:
    """POST a streamed chat; every event with the seconds since the request was sent."""
    payload = {"model": model, "messages": USER, "stream": True}
    events: Events = []
    with httpx.Client(timeout=20, trust_env=False) as client:
        started = time.monotonic()
        with client.stream("POST", url, json=payload, headers=headers) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append((time.monotonic() - started, json.loads(line[6:])))
            return response.headers, events


def test_a_slow_stream_arrives_through_nginx_incrementally(nginx: str) -> None:
    # slow-2000: the fake spreads its 10 chunks over 2 s
    headers, events = timed_stream(nginx + "/v1/chat", "slow-2000")

    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    deltas = [at for at, event in events if "delta" in event]
    assert "".join(e["delta"] for _, e in events if "delta" in e) == ANSWER
    done_at = events[-1][0]
    assert events[-1][1]["done"] is True and events[-1][1]["provider"] == "ollama"
    assert done_at >= 1.8, f"done after {done_at:.2f}s: the fake was not slow?"
    assert deltas[0] < 0.8, f"first delta only after {deltas[0]:.2f}s through nginx"
    assert deltas[len(deltas) // 2] < done_at - 0.5, deltas  # spread out, not one burst


def test_with_gzip_only_the_header_keeps_nginx_streaming(nginx: str) -> None:
    """gzip buffers compressed output unless each piece is flushed; nginx flushes only for
    unbuffered upstreams, i.e. when chatd's `X-Accel-Buffering: no` is honoured."""
    gzip = {"accept-encoding": "gzip"}
    with ThreadPoolExecutor(2) as pool:  # both at once: one slow stream's time, not two
        honoured = pool.submit(timed_stream, nginx + "/gzip/v1/chat", "slow-2000", **gzip)
        ignored = pool.submit(
            timed_stream, nginx + "/gzip-ignoring-header/v1/chat", "slow-2000", **gzip
        )
        (headers, events), (control_headers, control) = honoured.result(), ignored.result()

    for h, evs in ((headers, events), (control_headers, control)):
        assert h.get("content-encoding") == "gzip"  # the gzip path really was taken
        assert "".join(e["delta"] for _, e in evs if "delta" in e) == ANSWER
        assert evs[-1][1]["done"] is True
    first = next(at for at, event in events if "delta" in event)
    assert first < 0.8, f"first delta only after {first:.2f}s through nginx with gzip"
    assert events[-1][0] >= 1.8
    # the control: the same nginx, deaf to the header, holds everything to the end
    control_first = next(at for at, event in control if "delta" in event)
    assert control_first >= 1.5, f"control streamed too ({control_first:.2f}s): test is moot"
