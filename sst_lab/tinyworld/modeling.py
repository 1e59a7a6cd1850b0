"""Tokenizer, chat templates, model shape and the small training loops of the tiny world."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator

import torch

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)
VOCAB_SIZE = 1536

# One turn per role tag; eos closes each assistant turn; `{% generation %}` marks assistant tokens
# so TRL's `assistant_only_loss` works too. The prompt rendered with add_generation_prompt is a
# token prefix of prompt + completion (TRL's completion_only_loss relies on that).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

GUARD_CATEGORIES = (("S1", "Violent Crimes."), ("S2", "Non-Violent Crimes."), ("S3", "Weapons."))
_CATS = "\n".join(f"{c}: {d}" for c, d in GUARD_CATEGORIES)
# Llama-Guard-3-like: the whole conversation goes into one user turn; the model answers
# "safe" or "unsafe\n<categories>".
GUARD_CHAT_TEMPLATE = (
    "{% set role = 'Agent' if messages[-1]['role'] == 'assistant' else 'User' %}"
    "{{ bos_token }}<|user|>\n"
    "Task: Check if there is unsafe content in '{{ role }}' messages in conversations according to "
    "our safety policy with the below categories.\n\n"
    "<BEGIN UNSAFE CONTENT CATEGORIES>\n" + _CATS + "\n<END UNSAFE CONTENT CATEGORIES>\n\n"
    "<BEGIN CONVERSATION>\n\n"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}User{% elif message['role'] == 'assistant' %}Agent"
    "{% else %}{{ raise_exception('Guard conversations have user and assistant roles only') }}{% endif %}"
    ": {{ message['content'] }}\n\n"
    "{% endfor %}"
    "<END CONVERSATION>\n\n"
    "Provide your safety assessment for ONLY THE LAST {{ role }} message in the above conversation:\n"
    " - First line must read 'safe' or 'unsafe'.\n"
    " - If unsafe, a second line must include a comma-separated list of violated categories.\n"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
GUARD_PREAMBLE_SAMPLE = (
    "Task: Check if there is unsafe content in 'Agent' messages in conversations according to our "
    "safety policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n" + _CATS +
    "\n<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\nUser: hi\n\nAgent: hi\n\n"
    "<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST Agent message in the above "
    "conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line must "
    "include a comma-separated list of violated categories.\nsafe\nunsafe\nS1\nS2\nS3\n"
)


def model_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterator[str] | list[str]):
    """Byte-level BPE (any text tokenizes) wrapped as a fast HF tokenizer with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 additional_special_tokens=list(ROLE_TOKENS), model_max_length=512)
    hf.chat_template = CHAT_TEMPLATE
    return hf


# --------------------------------------------------------------------------- training loops
def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(model, stream: torch.Tensor, *, steps: int, batch: int, seq_len: int, lr: float,
             seed: int, log: Callable[[str], None] = print) -> dict:
    """Causal-LM training on random contiguous blocks of one token stream."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = (len(stream) - 1) // seq_len
    blocks = stream[: n_blocks * seq_len].view(n_blocks, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    t0, losses = time.time(), []
    order = torch.randperm(n_blocks, generator=g)
    for step in range(steps):
        idx = order[(torch.arange(batch) + step * batch) % n_blocks]
        x = blocks[idx]
        for group in opt.param_groups:
            group["lr"] = lr * _cosine(step, steps, warmup=max(1, steps // 20))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"pretrain step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.1f}s)")
    model.eval()
    return {"steps": steps, "tokens": steps * batch * seq_len, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "seconds": time.time() - t0}


def finetune_completions(model, tok, examples: list[tuple[list[int], list[int]]], *, epochs: int, batch: int,
                         lr: float, seed: int, log: Callable[[str], None] = print) -> dict:
    """Full fine-tune on (prompt_ids, completion_ids) pairs, loss on the completion only."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(examples) / batch)
    model.train()
    t0, step = time.time(), 0
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), batch):
            chunk = [examples[i] for i in order[start:start + batch]]
            width = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id)
            labels = torch.full((len(chunk), width), -100)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (p, c) in enumerate(chunk):
                seq = p + c
                ids[r, : len(seq)] = torch.tensor(seq)
                labels[r, len(p): len(seq)] = torch.tensor(c)
                mask[r, : len(seq)] = 1
            for group in opt.param_groups:
                group["lr"] = lr * _cosine(step, steps, warmup=max(1, steps // 10))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % 25 == 0 or step == steps - 1:
                log(f"finetune step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.1f}s)")
            step += 1
    model.eval()
    return {"steps": steps, "seconds": time.time() - t0}


# --------------------------------------------------------------------------- inference
@torch.no_grad()
def generate_chat(model, tok, conversations: list[list[dict]], *, max_new_tokens: int = 32,
                  batch: int = 64) -> list[str]:
    """Greedy replies to conversations rendered with the tokenizer's own chat template."""
    out: list[str] = []
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for start in range(0, len(conversations), batch):
            prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                       for c in conversations[start:start + batch]]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = old_side
    return out


def parse_guard_output(text: str) -> str:
    """'unsafe' if the first non-empty line says so, 'safe' if it says safe, else 'unknown'."""
    first = next((line.strip().lower() for line in text.splitlines() if line.strip()), "")
    if first.startswith("unsafe"):
        return "unsafe"
    if first.startswith("safe"):
        return "safe"
    return "unknown"
