"""Write a tiny random-weight llama GGUF (a few hundred KB) with llama.cpp's own `gguf`
package, for scripts/interop.sh: nothing is downloaded from a model hub.

Its answers are nonsense but deterministic at temperature 0, and printable: the output
rows of byte and control tokens are zero, so greedy decoding always picks a word (no
half UTF-8 sequence, no early end) and an answer runs to `max_tokens`.
    python tests/interop/tiny_model.py OUT.gguf
"""

from __future__ import annotations

import string
import sys

import gguf
import numpy as np

N_EMBD = 64
N_FF = 128
N_LAYERS = 2
N_HEADS = 4
N_CTX_TRAIN = 2048
WORDS = (
    "the a of to and in is it that for on with as was at by be this from or an are not "
    "hello world chat model token gateway answer river stone cloud light green blue small "
    "quick brown fox jumps over lazy dog red house tree water fire earth wind time day"
).split()
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def vocab() -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style pieces: <unk>, <s>, </s>, the 256 bytes, then letters and words."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = list(string.ascii_letters + string.digits + string.punctuation)
    pieces += ["\u2581" + c for c in string.ascii_lowercase]
    pieces += ["\u2581" + w for w in WORDS]
    pieces = list(dict.fromkeys(pieces))  # each piece once ("a" is a letter and a word)
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    scores = [0.0] * 259 + [float(len(p)) for p in pieces]  # longer pieces merge first
    return tokens, scores, [int(t) for t in types]


def write(path: str, seed: int = 29) -> None:
    rng = np.random.default_rng(seed)
    tokens, scores, types = vocab()
    n_vocab = len(tokens)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("chatd-interop-tiny")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_HEADS)
    writer.add_rope_dimension_count(N_EMBD // N_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML)

    def weights(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    output = weights(n_vocab, N_EMBD, scale=1.0)
    output[:259] = 0.0  # never a byte or control token: printable, full-length answers
    writer.add_tensor("token_embd.weight", weights(n_vocab, N_EMBD, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    for i in range(N_LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", weights(N_EMBD, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weights(N_EMBD, N_FF))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    write(sys.argv[1])
