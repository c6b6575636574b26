"""The fake upstream: static Ollama / OpenAI bodies served by one nginx worker.

nginx cannot branch on a JSON body, so each body has its own `location`: the small ones
as an inline `return 200 '...'`, the streams (too long for one nginx parameter) as static
files under `/stream`, served to a POST by the `error_page 405 =200 $uri` trick.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

WORDS = (
    "Hello from nginx, this is a static stream of twenty small chunks that a "
    "gateway relays to its caller one event at a time until done"
).split()[:20]

OLLAMA_CHAT = {
    "model": "bench",
    "message": {"role": "assistant", "content": "Hello from nginx"},
    "done": True,
    "done_reason": "stop",
    "prompt_eval_count": 12,
    "eval_count": 4,
}

OPENAI_CHAT = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello from nginx"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},
}


# One embedding of a typical size (768 dimensions), as Ollama's /api/embed and an OpenAI
# vendor's /v1/embeddings answer it for a one-string input.
VECTOR = [round(math.sin(i * 0.37) * 0.05, 8) for i in range(768)]
OLLAMA_EMBED = {"model": "bench", "embeddings": [VECTOR], "prompt_eval_count": 4}
OPENAI_EMBED = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": VECTOR}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 4, "total_tokens": 4},
}


def _dump(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def ollama_ndjson() -> str:
    """Ollama's /api/chat stream: one JSON object per line, the last one `done`."""
    lines = [
        _dump(
            {
                "model": "bench",
                "created_at": "2026-01-01T00:00:00Z",
                "message": {"role": "assistant", "content": w + " "},
                "done": False,
            }
        )
        for w in WORDS
    ]
    lines.append(
        _dump(
            {
                "model": "bench",
                "created_at": "2026-01-01T00:00:00Z",
                "message": {"role": "assistant", "content": ""},
                "done": True,
                "done_reason": "stop",
                "prompt_eval_count": 12,
                "eval_count": len(WORDS),
            }
        )
    )
    return "\n".join(lines) + "\n"


def openai_sse() -> str:
    """OpenAI's chat.completion.chunk stream with a usage chunk and [DONE]."""
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini",
    }

    def chunk(delta: dict, finish: str | None = None, **extra: object) -> str:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
        return "data: " + _dump({**base, "choices": choices, **extra}) + "\n\n"

    parts = [chunk({"role": "assistant", "content": ""})]
    parts += [chunk({"content": w + " "}) for w in WORDS]
    parts.append(chunk({}, "stop"))
    usage = {"prompt_tokens": 12, "completion_tokens": len(WORDS), "total_tokens": 32}
    parts.append("data: " + _dump({**base, "choices": [], "usage": usage}) + "\n\n")
    parts.append("data: [DONE]\n\n")
    return "".join(parts)


def _location(path: str, ctype: str, body: str) -> str:
    assert "'" not in body and "\\" not in body and "$" not in body
    return (
        f"    location = {path} {{\n      default_type {ctype};\n"
        f"      return 200 '{body}';\n    }}\n"
    )


def _file_location(root: Path, path: str, ctype: str, body: str) -> str:
    f = root / path.lstrip("/")
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(body)
    return (
        f"    location = {path} {{\n      root {root};\n      default_type {ctype};\n"
        f"      add_header Cache-Control no-cache;\n      error_page 405 =200 $uri;\n    }}\n"
    )


def nginx_config(out: Path, port: int) -> str:
    tmp = out / "nginx-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    temps = "\n".join(
        f"  {k}_temp_path {tmp / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    locations = "".join(
        [
            _location("/api/chat", "application/json", _dump(OLLAMA_CHAT)),
            _location("/v1/chat/completions", "application/json", _dump(OPENAI_CHAT)),
            _file_location(
                out / "static", "/stream/api/chat", "application/x-ndjson", ollama_ndjson()
            ),
            _file_location(
                out / "static", "/stream/v1/chat/completions", "text/event-stream", openai_sse()
            ),
            _file_location(out / "static", "/api/embed", "application/json", _dump(OLLAMA_EMBED)),
            _file_location(
                out / "static", "/v1/embeddings", "application/json", _dump(OPENAI_EMBED)
            ),
        ]
    )
    return f"""# generated by bench/upstream.py -- do not edit
worker_processes 1;
daemon off;
pid {out / "nginx.pid"};
error_log {out / "nginx-error.log"} warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  types {{ }}
  etag off;
{temps}
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port};
{locations}    location / {{ default_type application/json; return 404 '{{"error":"not found"}}'; }}
  }}
}}
"""
