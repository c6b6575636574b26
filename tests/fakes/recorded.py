"""Error answers as real servers give them: status, body, headers, byte for byte.

The fake upstream answers a model named `said-<name>` with `RECORDED[name]` (on every
path, chat or embeddings), so the fast suite meets the bodies chatd meets in production.
`llamacpp_*` were recorded from llama.cpp's own llama-server (scripts/interop.sh builds
one); the others are the vendors' documented or commonly reported answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recorded:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


RECORDED: dict[str, Recorded] = {
    # -- context overflows, one per dialect -------------------------------------------
    "llamacpp_overflow": Recorded(
        400,
        b'{"error":{"code":400,"message":"request (1257 tokens) exceeds the available context'
        b' size (256 tokens), try increasing it","type":"exceed_context_size_error",'
        b'"n_prompt_tokens":1257,"n_ctx":256}}',
    ),
    "llamacpp_overflow_unsized": Recorded(  # llama-server before its message named sizes
        400,
        b'{"error":{"code":400,"message":"the request exceeds the available context size,'
        b' try increasing it","type":"exceed_context_size_error","n_prompt_tokens":4263,'
        b'"n_ctx":4096}}',
    ),
    "llamacpp_embed_overflow": Recorded(  # --embeddings: an input over the physical batch
        500,
        b'{"error":{"code":500,"message":"input (1004 tokens) is too large to process. increase'
        b' the physical batch size (current batch size: 512)","type":"server_error"}}',
    ),
    "openai_overflow": Recorded(
        400,
        b'{\n  "error": {\n    "message": "This model\'s maximum context length is 128000 tokens.'
        b" However, your messages resulted in 130017 tokens. Please reduce the length of the"
        b' messages.",\n    "type": "invalid_request_error",\n    "param": "messages",\n'
        b'    "code": "context_length_exceeded"\n  }\n}\n',
    ),
    "openrouter_overflow": Recorded(
        400,
        b'{"error":{"message":"This endpoint\'s maximum context length is 131072 tokens.'
        b" However, you requested about 205591 tokens (205591 of text input). Please reduce"
        b' the length of either one, or use the \\"middle-out\\" transform to compress your'
        b' prompt automatically.","code":400,"metadata":{"provider_name":null}}}',
    ),
    "vllm_overflow": Recorded(
        400,
        b'{"object":"error","message":"This model\'s maximum context length is 4096 tokens.'
        b" However, you requested 4200 tokens (4100 in the messages, 100 in the completion)."
        b' Please reduce the length of the messages or completion.","type":"BadRequestError",'
        b'"param":null,"code":400}',
    ),
    "anthropic_overflow": Recorded(
        400,
        b'{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too'
        b' long: 208310 tokens > 200000 maximum"},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}',
    ),
    "ollama_overflow": Recorded(400, b'{"error":"the input length exceeds the context length"}'),
    "ollama_overflow_500": Recorded(  # older Ollama said the same with a 500
        500, b'{"error":"the input length exceeds the context length"}'
    ),
    # -- the other rows of the table ------------------------------------------------------
    "llamacpp_bad_param": Recorded(  # recorded: response_format {"type": "bogus"}
        400,
        b'{"error":{"code":400,"message":"response_format type must be one of \\"text\\" or'
        b' \\"json_object\\", but got: bogus","type":"invalid_request_error"}}',
    ),
    "openai_bad_param": Recorded(
        400,
        b'{"error":{"message":"Invalid type for \'temperature\': expected a decimal, but got a'
        b' string instead.","type":"invalid_request_error","param":"temperature",'
        b'"code":"invalid_type"}}',
    ),
    "nginx_413": Recorded(
        413,
        b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
        b"<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>"
        b"\r\n</body>\r\n</html>\r\n",
        content_type="text/html",
    ),
    "vllm_422": Recorded(
        422,
        b'{"detail":[{"type":"missing","loc":["body","messages"],"msg":"Field required",'
        b'"input":{"model":"m"}}]}',
    ),
    "openai_model_not_found": Recorded(
        404,
        b'{"error":{"message":"The model `gpt-9` does not exist or you do not have access to'
        b' it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}',
    ),
    "ollama_model_not_found": Recorded(
        404, b'{"error":"model \\"llama9\\" not found, try pulling it first"}'
    ),
    "llamacpp_bad_key": Recorded(
        401,
        b'{"error":{"message":"Invalid API Key","type":"authentication_error","code":401}}',
    ),
    "anthropic_forbidden": Recorded(
        403,
        b'{"type":"error","error":{"type":"permission_error","message":"Your API key does not'
        b' have permission to use the specified resource."}}',
    ),
    "openai_rate_limited": Recorded(
        429,
        b'{"error":{"message":"Rate limit reached for gpt-4o on tokens per min (TPM): Limit'
        b' 30000, Used 29000, Requested 2000. Please try again in 2s.","type":"tokens",'
        b'"param":null,"code":"rate_limit_exceeded"}}',
        headers={"Retry-After": "2"},
    ),
    "anthropic_overloaded": Recorded(
        529, b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    ),
    "openai_server_error": Recorded(
        500,
        b'{"error":{"message":"The server had an error while processing your request. Sorry'
        b' about that!","type":"server_error","param":null,"code":null}}',
    ),
}
