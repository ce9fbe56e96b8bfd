"""A tiny random Llama and a locally trained tokenizer with a chat template: the tests' model.

Built from nothing but `tokenizers` and `transformers`, so the tests need no hub access.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "write a short poem about the sea and the sky",
    "explain why the sun rises in the east every morning",
    "list three fruits: apple, banana, cherry. Numbers 0123456789!?",
    "user assistant system You are a helpful assistant.",
    "good bad yes no maybe please thank you hello world",
]


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


def build_tiny_model(path: str | Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Path:
    """Save a random 2-layer Llama plus tokenizer to `path` and return it."""
    path = Path(path)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_reward_model(
    path: str | Path, chat_template: bool = True, num_labels: int = 1, hidden_size: int = 32, seed: int = 0
) -> Path:
    """A random 2-layer Llama sequence classifier (num_labels 1: a reward model) with the tests' tokenizer. vLLM's
    CPU attention needs a head size of 64 (hidden_size 256)."""
    tokenizer = build_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


TOPICS = ["the sea", "a fox", "the sun", "apples", "the sky", "a dog", "hello", "numbers", "fruit", "a poem", "morning", "why"]
# the keys of a pairs.jsonl row, as `selfie judge` and the loop's judge stage write it
PAIR_KEYS = {
    "prompt_id",
    "prompt",
    "chosen",
    "rejected",
    "margin",
    "chosen_finished",
    "rejected_finished",
    "chosen_tokens",
    "rejected_tokens",
}


@contextlib.contextmanager
def held_output_lock(output: str | Path) -> Iterator[subprocess.Popen]:
    """Another process holding selfie's output lock on `output` for as long as the block runs."""
    code = f"from selfie.run.lock import output_lock; import time\nwith output_lock({str(output)!r}):\n    print('locked', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def toy_pairs(n: int = 8) -> list[dict]:
    """A learnable preference: chosen always agrees, rejected always refuses. Extra columns as in pairs.jsonl."""
    return [
        {
            "prompt_id": f"p{i}",
            "margin": 0.5,
            "prompt": [{"role": "user", "content": f"say something about {TOPICS[i % len(TOPICS)]} {i}"}],
            "chosen": [{"role": "assistant", "content": "yes, thank you" + " please" * (i % 3)}],
            "rejected": [{"role": "assistant", "content": "no bad" + " no" * (i % 4)}],
        }
        for i in range(n)
    ]


def perturb_adapter(model: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Move the trainable adapter "default" away from where it started (so policy != reference)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".default." in name:
                param.add_(scale * torch.randn(param.shape, generator=gen))
