"""Inference engines: greedy generation and multiple-choice letter scoring behind one small Protocol.

Every suite talks to an :class:`Engine`; the default :class:`HFEngine` runs a transformers model
(+ an optional PEFT adapter) on this machine. A vLLM backend for GPU runs only has to implement
the same two methods with the same semantics (see ``evaluate/README.md``):

* ``generate(conversations, max_new_tokens)``: greedy decoding of the reply to each conversation,
  rendered with the model tokenizer's own chat template (``add_generation_prompt=True``); the
  decoded new tokens without special tokens, whitespace-stripped, in input order.
* ``choice_logprobs(prompts, letters)``: for each conversation (rendered the same way), the
  log-probability (log-softmax over the whole vocabulary) of each letter's single token as the
  first token of the assistant's reply; shape ``(len(prompts), len(letters))``.

Classification suites (SST-2) also need ``generate_with_label_logprobs(conversations,
max_new_tokens, labels)``: the greedy replies and, from the same prefill, each label's first-token
log-probability at the reply's first position (the raw logits of the first generation step), so
the prompt is computed once for both scores. The labels' first tokens must differ (an error if not).

MMLU suites in an lm-eval format also need ``render_text(conversation)`` (the chat-template string
with the generation prompt), ``encode_pair(context, continuation)`` and
``continuation_logprobs(contexts, continuations)``: lm-eval 0.4.x's log-likelihood semantics, i.e.
trailing whitespace of the context moves to the front of the continuation, the continuation's
tokens are those of ``context + continuation`` after the context's tokens, special tokens are
added as the tokenizer does by default unless the text already starts with the BOS token, and the
score of a continuation is the sum of its tokens' log-probabilities.

Batching (``HFEngine``): prompts are sorted by length (longest first, so an out-of-memory error
appears in the first batch), cut into batches of ``batch_size`` and left-padded. A plain forward
on left-padded inputs needs ``position_ids = attention_mask.cumsum(-1) - 1`` (``generate`` builds
them itself). Outputs are returned in input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

Conversation = list[dict[str, Any]]


class EngineError(ValueError):
    """A model/tokenizer cannot do what an evaluation needs; the message names the model."""


@runtime_checkable
class Engine(Protocol):
    """What an evaluation suite needs from an inference backend."""

    name: str

    def generate(self, conversations: Sequence[Conversation], max_new_tokens: int) -> list[str]: ...

    def choice_logprobs(self, prompts: Sequence[Conversation], letters: Sequence[str]) -> np.ndarray: ...


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (stable for equal lengths)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class HFEngine:
    """A transformers causal LM (optionally a PeftModel) with its tokenizer; greedy, batched."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str, batch_size: int = 16,
                 static_cache: bool = False):
        if not getattr(tokenizer, "chat_template", None):
            raise EngineError(f"model {name}: its tokenizer has no chat template; evaluation applies the "
                              "model's own chat template to every prompt (use an instruct/chat model or "
                              "give the tokenizer a chat_template)")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.batch_size, self.static_cache = batch_size, static_cache
        self.load_tags: dict[str, str] = {}  # which weights were loaded (see sst_lab.models.load_for_inference)
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_token_id = gen_eos if gen_eos is not None else tokenizer.eos_token_id
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, base_model: str, adapter_path: str | None = None, *, dtype: str = "auto",
             device: str | None = None, batch_size: int = 16, static_cache: bool = False) -> "HFEngine":
        from sst_lab.models import load_for_inference

        model, tok, tags = load_for_inference(base_model, adapter_path, dtype=dtype, device=device)
        name = base_model if adapter_path is None else f"{base_model}+{adapter_path}"
        engine = cls(model, tok, name=name, batch_size=batch_size, static_cache=static_cache)
        engine.load_tags = tags
        return engine

    PROBE = [{"role": "user", "content": "What is the capital of France?"}]

    def check_finite(self) -> None:
        """Every weight (base and adapter) is finite, and so are the logits of a probe prompt: a
        broken model fails here instead of generating empty text that would read as harmless."""
        import torch

        bad = [name for name, p in self.model.named_parameters()
               if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            raise EngineError(f"model {self.name}: {len(bad)} weight tensor(s) hold NaN/Inf, e.g. {bad[:5]}")
        ids, mask = self._pad_left([self.render(self.PROBE)])
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        if not torch.isfinite(logits).all():
            raise EngineError(f"model {self.name}: the probe prompt {self.PROBE[0]['content']!r} gives NaN/Inf "
                              "logits although every weight is finite (overflow in this dtype?)")

    # ------------------------------------------------------------------------ rendering
    def render(self, conversation: Conversation) -> list[int]:
        """Token ids of the conversation in the chat template, ending with the assistant header."""
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render_text(self, conversation: Conversation) -> str:
        """The chat-template string of the conversation, ending with the assistant header."""
        return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a raw string: the tokenizer's default special tokens, none when the text
        already starts with the BOS token (a chat-template string)."""
        bos = self.tokenizer.bos_token
        special = not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval splits them (see the module docstring)."""
        stripped = context.rstrip()
        if not stripped:
            raise EngineError(f"model {self.name}: an empty context cannot be scored")
        continuation = context[len(stripped):] + continuation
        whole, ctx = self.encode_text(stripped + continuation), self.encode_text(stripped)
        if whole[:len(ctx)] != ctx or len(whole) == len(ctx):
            raise EngineError(f"model {self.name}: the context's tokens are not a prefix of context + "
                              f"continuation {continuation!r} (lm-eval would score a different split)")
        return ctx, whole[len(ctx):]

    def continuation_logprobs(self, contexts: Sequence[str], continuations: Sequence[Sequence[str]]) -> np.ndarray:
        """Summed log-probability of each continuation after its context; shape (items, choices)."""
        import torch

        n_choices = len(continuations[0]) if continuations else 0
        if any(len(c) != n_choices for c in continuations) or len(continuations) != len(contexts):
            raise EngineError(f"model {self.name}: every context needs the same number of continuations")
        pairs = [self.encode_pair(ctx, cont) for ctx, conts in zip(contexts, continuations) for cont in conts]
        seqs = [c + k for c, k in pairs]
        flat = np.zeros(len(pairs), dtype=np.float64)
        with torch.inference_mode():
            for batch in length_sorted_batches([len(s) for s in seqs], self.batch_size):
                ids, mask = self._pad_left([seqs[i] for i in batch])
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                keep = max(len(pairs[i][1]) for i in batch) + 1
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                    logits_to_keep=keep, use_cache=False).logits
                logp = torch.log_softmax(logits.float(), dim=-1)
                for row, i in enumerate(batch):
                    cont = pairs[i][1]
                    # logits at position t predict token t+1: the continuation's tokens are the last len(cont)
                    at = logp[row, keep - 1 - len(cont):keep - 1, :]
                    target = torch.tensor(cont, device=at.device).unsqueeze(-1)
                    flat[i] = float(at.gather(-1, target).sum())
        if not np.all(np.isfinite(flat)):
            raise EngineError(f"model {self.name}: non-finite continuation log-probabilities")
        return flat.reshape(len(contexts), n_choices)

    def _pad_left(self, rows: list[list[int]]):
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------------ the protocol
    def generate(self, conversations: Sequence[Conversation], max_new_tokens: int) -> list[str]:
        return self.generate_ids([self.render(c) for c in conversations], max_new_tokens)

    def generate_ids(self, encoded: Sequence[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy continuations of already tokenized prompts (e.g. a classifier's own prompt format)."""
        return self._generate(encoded, max_new_tokens, None)[0]

    def generate_with_label_logprobs(self, conversations: Sequence[Conversation], max_new_tokens: int,
                                     labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """Greedy replies and, from the same prefill, each label's first-token log-probability at
        the reply's first position (raw logits of generation step 1, log-softmax over the vocabulary):
        the prompt is computed once for both. Shape of the scores: ``(len(conversations), len(labels))``."""
        label_ids = self.label_first_token_ids(labels)
        texts, logp = self._generate([self.render(c) for c in conversations], max_new_tokens, label_ids)
        if not np.all(np.isfinite(logp)):
            raise EngineError(f"model {self.name}: non-finite label log-probabilities")
        return texts, logp

    def _generate(self, encoded: Sequence[list[int]], max_new_tokens: int,
                  score_ids: Sequence[int] | None) -> tuple[list[str], np.ndarray | None]:
        """Greedy decoding in length-sorted, left-padded batches; with ``score_ids``, also the
        log-softmax of the first step's raw logits (``output_logits``: before any logits processor)
        at those token ids."""
        import torch
        from transformers import GenerationConfig

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        scoring = score_ids is not None
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_token_id,
                                  cache_implementation="static" if self.static_cache else None,
                                  return_dict_in_generate=True, output_logits=scoring)
        out: list[str | None] = [None] * len(encoded)
        scores = np.zeros((len(encoded), len(score_ids)), dtype=np.float64) if scoring else None
        with torch.inference_mode():
            for batch in length_sorted_batches([len(e) for e in encoded], self.batch_size):
                ids, mask = self._pad_left([encoded[i] for i in batch])
                gen = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                texts = self.tokenizer.batch_decode(gen.sequences[:, ids.shape[1]:], skip_special_tokens=True)
                for i, text in zip(batch, texts):
                    out[i] = text.strip()
                if scoring:
                    first = torch.log_softmax(gen.logits[0].float(), dim=-1)[:, list(score_ids)]
                    scores[batch] = first.double().cpu().numpy()
        return [t if t is not None else "" for t in out], scores

    def label_first_token_ids(self, labels: Sequence[str]) -> list[int]:
        """Each label's first token as the reply's first token: the tokens of (rendered prompt +
        label) after the prompt's, on the probe conversation. The labels' first tokens must differ,
        else first-token scoring could not tell them apart (an error naming the labels)."""
        context = self.render_text(self.PROBE)
        ctx = self.encode_text(context)
        ids = []
        for label in labels:
            whole = self.encode_text(context + label)
            if not label or whole[:len(ctx)] != ctx or len(whole) == len(ctx):
                raise EngineError(f"model {self.name}: label {label!r} does not tokenize as a continuation of "
                                  "the assistant header (empty label, or it merges with the header's last token)")
            ids.append(whole[len(ctx)])
        for j, tok in enumerate(ids):
            if ids.index(tok) != j:
                raise EngineError(
                    f"model {self.name}: labels {labels[ids.index(tok)]!r} and {labels[j]!r} share their first "
                    f"token {self.tokenizer.convert_ids_to_tokens(tok)!r} (id {tok}); label scoring reads one "
                    "token per label at the reply's first position, so the labels' first tokens must differ")
        return ids

    def letter_token_ids(self, letters: Sequence[str]) -> list[int]:
        ids = []
        for letter in letters:
            toks = self.tokenizer.encode(letter, add_special_tokens=False)
            if len(toks) != 1:
                raise EngineError(f"model {self.name}: answer letter {letter!r} is {len(toks)} tokens, "
                                  "multiple-choice scoring reads one token per letter")
            ids.append(toks[0])
        if len(set(ids)) != len(ids):
            raise EngineError(f"model {self.name}: letters {list(letters)} do not map to distinct tokens")
        return ids

    def choice_logprobs(self, prompts: Sequence[Conversation], letters: Sequence[str]) -> np.ndarray:
        import torch

        letter_ids = torch.tensor(self.letter_token_ids(letters), device=self.device)
        encoded = [self.render(p) for p in prompts]
        out = np.zeros((len(encoded), len(letters)), dtype=np.float64)
        with torch.inference_mode():
            for batch in length_sorted_batches([len(e) for e in encoded], self.batch_size):
                ids, mask = self._pad_left([encoded[i] for i in batch])
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                    logits_to_keep=1, use_cache=False).logits[:, -1, :]
                logp = torch.log_softmax(logits.float(), dim=-1)[:, letter_ids]
                out[batch] = logp.double().cpu().numpy()
        if not np.all(np.isfinite(out)):
            raise EngineError(f"model {self.name}: non-finite letter log-probabilities")
        return out

    def close(self) -> None:
        """Drop the model (frees accelerator memory before the next model is loaded)."""
        import gc

        self.model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass
