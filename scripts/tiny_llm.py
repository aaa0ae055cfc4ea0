"""A tiny local Llama (2 layers, hidden 128, random weights) and tokenizer in a directory; optionally served by vLLM.

    PY=$(scripts/vllm_env.sh)
    $PY scripts/tiny_llm.py build /tmp/tiny-llm
    $PY scripts/tiny_llm.py serve /tmp/tiny-llm --port 8011 [more vllm serve options]

Nothing is downloaded: the byte-level BPE tokenizer is trained here with ``tokenizers``
on a few paragraphs of text and carries a chat template, so the chat endpoint and the
Ray Data LLM chat-template stage work. vLLM loads the model with ``--load-format dummy``
(random weights); structured output still forces schema-valid JSON out of it, so the
whole summarise path runs for real. Run with the vLLM virtualenv's python.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = [
    '{"failures": [{"type": "Colour confusion", "description": "Colours of objects are swapped"}]}',
    '{"failures": [{"type": "Counting", "description": "The number of people is ignored"}]}',
    "A black dog runs through the grass. A brown dog jumps over a fence.",
    "Two children play on the beach near the water. A man in a red shirt climbs a rock.",
    "A woman rides a bicycle down a busy street. A group of people stand outside a building.",
    "Spatial relations: left and right, above and below, in front of and behind are confused.",
    "Text in the image, negation, object size, viewpoint, time of day, weather and season.",
    "I am trying to find failures with an embedding model. The first sentence is the main caption.",
    "0 1 2 3 4 5 6 7 8 9 10 : , . ; ! ? ' \" { } [ ] ( ) - _ / \\ \u2026 \u00e9 \u00fc \u4e00",
]


def build(out: str, vocab_size: int = 512) -> str:
    """Write config, random weights and tokenizer of the tiny Llama to ``out``; returns ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(out)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return out
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=SPECIAL[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    (path / "clipscan-tiny.json").write_text(json.dumps({"vocab": len(fast), "layers": 2, "hidden": 128}) + "\n")
    return out


def serve_command(model_dir: str, port: int, name: str, extra: list[str]) -> list[str]:
    """The ``vllm serve`` command line for the tiny model (the vllm binary beside this python).

    Eager mode: vLLM's default compiles the model with torch.compile at start-up, about 30 s
    on 2 CPU cores, which a two-layer model with random weights gains nothing from.
    """
    vllm = str(Path(sys.executable).with_name("vllm"))
    return [
        vllm, "serve", model_dir, "--load-format", "dummy", "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", name, "--max-model-len", "4096", "--max-num-seqs", "8",
        "--enforce-eager", "--disable-log-stats", *extra,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the tiny model and tokenizer directory")
    b.add_argument("dir")
    s = sub.add_parser("serve", help="build if missing, then exec `vllm serve` on it")
    s.add_argument("dir")
    s.add_argument("--port", type=int, default=8011)
    s.add_argument("--name", default="tiny-llm", help="the model name clients send")
    args, extra = parser.parse_known_args(argv)  # unknown options go to `vllm serve`
    if args.cmd == "build" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    build(args.dir)
    if args.cmd == "build":
        print(args.dir)
        return 0
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cmd = serve_command(args.dir, args.port, args.name, extra)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # the server takes this pid, so a parent can stop it by pid
    return 1


if __name__ == "__main__":
    sys.exit(main())
