"""Continuous batching for causal LMs: every live sequence (streamed or not) advances in one shared forward per step.

One engine thread per replica owns the model's KV cache. A request's prompt is prefilled alone (exact, no padding),
then its cache rows join the running batch, left-padded to the batch's length; finished or abandoned sequences leave
it between steps. Each row has its own position ids and attention mask, so a sequence's greedy output is the one it
gets alone. (transformers' own continuous batching needs paged attention kernels; this runs anywhere `forward` does.)
Sampling uses a per-sequence `torch.Generator`, so a seeded request draws the same tokens whoever it shares a step with.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_TOP_LOGPROBS = 5
MIN_TEMPERATURE = 1e-4  # below it sampling is greedy (and a float32 division by it would overflow)


@dataclass
class Sequence:
    """One choice being generated; the engine thread writes, the request's event loop reads `events`."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    top_logprobs: int | None  # None: no logprobs; else how many alternatives per token (0..5)
    echo: bool  # send the prompt (and its logprobs) first
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    index: int = 0  # the choice's index in its request; every event carries it
    generated: list[int] = field(default_factory=list)
    text: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    generator: torch.Generator | None = None

    def emit(self, event: dict) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, {**event, "index": self.index})


class GenerationEngine:
    """Runs the step loop on a daemon thread; `submit` enqueues a sequence whose events arrive on its queue.

    Events (each with the sequence's `index`): `{"prompt_text", "prompt_logprobs"}` (echo only), then per token
    `{"token": id, "eos": bool, "text": delta, "logprob": {token, logprob, top}}`, then `{"tail": text}` (bytes held
    back as an unfinished character) and `{"done": "eos" | "length"}`;
    or `{"error": exc}`. `text` is absent while a token ends mid-character; `logprob` only when asked for.
    """

    def __init__(self, model, tokenizer, eos_id: int | None, max_batch_size: int, device: str,
                 on_step=None, on_first_token=None):
        self.model, self.tokenizer, self.eos_id = model, tokenizer, eos_id
        self.max_batch_size, self.device = max_batch_size, device
        self.on_step, self.on_first_token = on_step, on_first_token  # metrics hooks (batch size; seconds)
        self.pending: list[Sequence] = []
        self.wake = threading.Condition()
        self.step_batch_sizes: Counter[int] = Counter()  # decode steps per batch size
        self.max_streams_in_step = 0
        self.active = 0  # sequences in the running batch (read by consumers to size their deltas)
        threading.Thread(target=self._run, name="raylm-generation", daemon=True).start()

    # ------------------------------------------------------------------------------------ public
    def submit(self, seq: Sequence) -> None:
        if seq.temperature >= MIN_TEMPERATURE:
            seq.generator = torch.Generator(device="cpu")
            if seq.seed is not None:  # any JSON integer: torch takes 64 bits
                seq.generator.manual_seed(seq.seed & 0xFFFF_FFFF_FFFF_FFFF)
            else:
                seq.generator.seed()
        with self.wake:
            self.pending.append(seq)
            self.wake.notify()

    def stats(self) -> dict:
        sizes = dict(sorted(self.step_batch_sizes.items()))
        return {"decode_steps_by_batch_size": sizes, "max_sequences_per_step": self.max_streams_in_step,
                "decode_steps": sum(sizes.values())}

    # ----------------------------------------------------------------------------------- the loop
    def _run(self) -> None:
        active: list[Sequence] = []
        cache = mask = lengths = last = None
        while True:
            with self.wake:
                while not active and not self.pending:
                    self.wake.wait()
                room = self.max_batch_size - len(active)
                admitted, self.pending = self.pending[:room], self.pending[room:]
            try:
                with torch.inference_mode():
                    for seq in admitted:
                        if seq.cancelled.is_set():
                            continue
                        c, token = self._prefill(seq)
                        if token is None:
                            continue
                        cache, mask, lengths, last = self._join(cache, mask, lengths, last, c, seq, token)
                        active.append(seq)
                    # drop finished/abandoned rows before paying for their forward
                    keep = [i for i, s in enumerate(active) if not self._finished(s)]
                    if len(keep) < len(active):
                        active = [active[i] for i in keep]
                        if not active:
                            cache = mask = lengths = last = None
                            self.active = 0
                            continue
                        cache, mask, lengths, last = self._select(cache, mask, lengths, last, keep)
                    if not active:
                        continue
                    self._record_step(len(active))
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    out = self.model(input_ids=last[:, None], attention_mask=mask, position_ids=lengths[:, None],
                                     past_key_values=cache, use_cache=True)
                    cache, lengths = out.past_key_values, lengths + 1
                    logits = out.logits[:, -1].float()
                    tokens = [self._advance(seq, logits[i]) for i, seq in enumerate(active)]
                    last = torch.tensor(tokens, dtype=torch.long, device=self.device)
            except BaseException as e:  # noqa: BLE001 - every waiting request hears of it; the loop lives on
                for seq in active + admitted:
                    seq.emit({"error": e})
                active, cache = [], None
                mask = lengths = last = None

    def _finished(self, seq: Sequence) -> bool:
        if seq.cancelled.is_set():
            return True
        eos = self.eos_id is not None and bool(seq.generated) and seq.generated[-1] == self.eos_id
        if eos or len(seq.generated) >= seq.max_tokens:
            # bytes held back as an unfinished character are text after all: flush them
            text = self.tokenizer.decode(seq.generated[:-1] if eos else seq.generated, skip_special_tokens=True)
            if len(text) > len(seq.text):
                seq.emit({"tail": text[len(seq.text):]})
                seq.text = text
            seq.emit({"done": "eos" if eos else "length"})
            return True
        return False

    def _record_step(self, n: int) -> None:
        self.active = n
        self.step_batch_sizes[n] += 1
        self.max_streams_in_step = max(self.max_streams_in_step, n)
        if self.on_step:
            self.on_step(n)

    def _prefill(self, seq: Sequence):
        """Forward the prompt alone; emit echo logprobs and the first token; return (cache, token)."""
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        logits = out.logits[0].float()
        if seq.echo:
            entries = None
            if seq.top_logprobs is not None:  # the first prompt token has no context: logprob None, as OpenAI's
                logp = logits.log_softmax(-1)
                entries = [{"token": self._piece(seq.prompt_ids[0]), "logprob": None, "top": []}] + [
                    self._logprob_entry(logp[i - 1], seq.prompt_ids[i], seq.top_logprobs)
                    for i in range(1, len(seq.prompt_ids))]
            seq.emit({"prompt_text": self.tokenizer.decode(seq.prompt_ids, skip_special_tokens=True),
                      "prompt_logprobs": entries})
        token = self._advance(seq, logits[-1])
        if self.on_first_token:
            self.on_first_token(time.perf_counter() - seq.submitted)
        return out.past_key_values, token

    def _advance(self, seq: Sequence, logits: torch.Tensor) -> int:
        """Pick the next token of `seq` from its raw logits, record it, emit its text delta (and logprob)."""
        if seq.temperature >= MIN_TEMPERATURE:
            # shift first: a tiny temperature sends the rest to -inf, never the best token to +inf (NaN)
            probs = ((logits - logits.max()) / seq.temperature).softmax(-1)
            if seq.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                # keep the smallest prefix whose mass reaches top_p (always the most likely token)
                drop = sorted_p.cumsum(-1) - sorted_p >= seq.top_p
                drop[0] = False  # even when top_p underflows to 0 in float32 (e.g. 1e-155): never an empty draw
                sorted_p[drop] = 0.0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
            token = int(torch.multinomial(probs.cpu(), 1, generator=seq.generator))
        else:
            token = int(logits.argmax())
        seq.generated.append(token)
        event: dict[str, Any] = {"token": token, "eos": token == self.eos_id}
        if token != self.eos_id:
            text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
            # a token ending mid-character decodes to U+FFFD until the next one completes it
            if not text.endswith("\ufffd"):
                event["text"], seq.text = text[len(seq.text):], text
        if seq.top_logprobs is not None:
            event["logprob"] = self._logprob_entry(logits.log_softmax(-1), token, seq.top_logprobs)
        seq.emit(event)
        return token

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _logprob_entry(self, logp: torch.Tensor, token: int, k: int) -> dict:
        top = logp.topk(k) if k else None
        return {"token": self._piece(token), "logprob": float(logp[token]),
                "top": [(self._piece(int(t)), float(v)) for v, t in zip(top.values, top.indices)] if top else []}

    # ----------------------------------------------------------------------------- cache surgery
    def _join(self, cache, mask, lengths, last, new_cache, seq: Sequence, token: int):
        """Append one prefilled sequence's cache rows to the batch, left-padding the shorter side."""
        n = len(seq.prompt_ids)
        new_mask = torch.ones((1, n), dtype=torch.long, device=self.device)
        new_len = torch.tensor([n], dtype=torch.long, device=self.device)
        new_last = torch.tensor([token], dtype=torch.long, device=self.device)
        if cache is None:
            return new_cache, new_mask, new_len, new_last
        total = max(mask.shape[1], n)
        for layer, new in zip(cache.layers, new_cache.layers):
            layer.keys = torch.cat([_pad_left(layer.keys, total), _pad_left(new.keys, total)], dim=0)
            layer.values = torch.cat([_pad_left(layer.values, total), _pad_left(new.values, total)], dim=0)
        mask = torch.cat([_pad_left(mask, total, dim=1), _pad_left(new_mask, total, dim=1)], dim=0)
        return cache, mask, torch.cat([lengths, new_len]), torch.cat([last, new_last])

    def _select(self, cache, mask, lengths, last, keep: list[int]):
        """Keep rows `keep`, then drop leading columns that are padding in every remaining row."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = mask[idx]
        first_real = int((mask.cumsum(1) == 0).sum(1).min())
        for layer in cache.layers:
            layer.keys = layer.keys[idx, :, first_real:]
            layer.values = layer.values[idx, :, first_real:]
        return cache, mask[:, first_real:], lengths[idx], last[idx]


def _pad_left(t: torch.Tensor, total: int, dim: int = 2) -> torch.Tensor:
    missing = total - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)
