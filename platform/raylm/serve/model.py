"""The model deployment: loads a Hugging Face model directory and answers batched and streamed requests.

Causal LMs generate through `GenerationEngine` (continuous batching: streamed and non-streamed requests share every
decode step); encoders answer classify / fill-mask / embeddings in `serve.batch` batches.

Only the task -> Auto class table comes from raylm's training code: any directory `transformers`' Auto classes can
load is servable.
Requests arrive as plain dicts already validated by the ingress (`raylm.serve.api`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
from collections import Counter
from pathlib import Path
from typing import AsyncIterator

from ray import serve

from raylm.serve.engine import GenerationEngine, Sequence
from raylm.serve.metrics import ReplicaMetrics
from raylm.train.models import TASK_AUTO_CLASSES as TRAINED_TASK_AUTO_CLASSES  # its one home

# the trained tasks, plus a bare encoder (BertModel: a sentence-transformers checkpoint), served for embeddings only
TASK_AUTO_CLASSES: dict[str, str] = {**TRAINED_TASK_AUTO_CLASSES, "embedding": "AutoModel"}
ENCODER_TASKS = ("classification", "masked_lm", "embedding")  # tasks whose hidden states embed text
TOKENS_PER_EVENT_EVERY = 4  # a streamed delta carries one more token per this many sequences in the batch

# config.json `architectures` suffix -> task, first match wins; the model's own head says what it can serve
ARCH_SUFFIX_TASKS: dict[str, str] = {
    "ForCausalLM": "causal_lm",
    "LMHeadModel": "causal_lm",
    "ForMaskedLM": "masked_lm",
    "ForSequenceClassification": "classification",
    "Model": "embedding",
}


def model_task(model_dir: str | os.PathLike, default: str | None = None) -> str:
    """The task a HF model directory serves: an explicit `task` field in config.json, else its architecture."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("task") in TASK_AUTO_CLASSES:
        return config["task"]
    for arch in config.get("architectures") or []:
        for suffix, task in ARCH_SUFFIX_TASKS.items():
            if arch.endswith(suffix):
                return task
    if default in TASK_AUTO_CLASSES:
        return default
    raise ValueError(f"cannot tell the task of {model_dir}: config.json architectures {config.get('architectures')}")


def context_length(model_dir: str | os.PathLike) -> int | None:
    """Longest sequence (prompt + generated) the model's position embeddings allow; None when unbounded."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut `text` at the earliest stop sequence; True when one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class ChoiceState:
    """One choice's text and logprob entries as engine events arrive; `drain` says what may be sent now."""

    def __init__(self, seq: Sequence, stop: list[str]):
        self.seq, self.stop = seq, stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # a tail that could still become a stop sequence
        self.text, self.sent = "", 0
        self.entries: list[tuple[int, dict]] = []  # (offset of the token's text, its logprob entry)
        self.entries_sent = 0
        self.prefix: dict | None = None  # echo: the prompt's text and entries, sent first
        self.finish: str | None = None
        self.done = False

    def take(self, ev: dict) -> None:
        if self.done:
            return
        if "error" in ev:
            raise RuntimeError(f"generation failed: {ev['error']!r}") from ev["error"]
        if "prompt_text" in ev:
            self.prefix = ev
        elif "token" in ev:
            if "logprob" in ev and not ev["eos"]:
                self.entries.append((len(self.text), ev["logprob"]))
            self.text += ev.get("text", "")
        elif "tail" in ev:
            self.text += ev["tail"]
        elif "done" in ev:
            self.finish = self.finish or ("stop" if ev["done"] == "eos" else "length")

    def drain(self) -> list[dict]:
        if self.done:
            return []
        out, index = [], self.seq.index
        if self.prefix is not None:
            out.append({"index": index, "text": self.prefix["prompt_text"],
                        "logprobs": self.prefix["prompt_logprobs"] or []})
            self.prefix = None
        cut, hit = truncate_at_stop(self.text, self.stop)
        if hit:
            self.finish = "stop"
            self.seq.cancelled.set()
        upto = len(cut) if self.finish else max(self.sent, len(self.text) - self.hold)
        n_entries = len(self.entries) if self.finish and not hit else \
            sum(1 for off, _ in self.entries if off < upto)
        if upto > self.sent or n_entries > self.entries_sent:
            out.append({"index": index, "text": self.text[self.sent:upto],
                        "logprobs": [e for _, e in self.entries[self.entries_sent:n_entries]]})
            self.sent, self.entries_sent = upto, n_entries
        if self.finish:
            self.done = True
            out.append({"index": index, "finish_reason": self.finish, "prompt_tokens": len(self.seq.prompt_ids),
                        "completion_tokens": len(self.seq.generated)})
        return out


@serve.deployment
class ModelServer:
    """One replica: the model on CPU or GPU, dynamic batches for non-streaming routes, token streams for SSE."""

    def __init__(self, model_dir: str, task: str | None = None, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, num_threads: int | None = None, name: str = "raylm"):
        import torch
        import transformers

        from raylm.storage import materialize

        model_dir = str(materialize(model_dir))  # one version: a versioned dir resolved once, a URI verified
        if num_threads:
            torch.set_num_threads(num_threads)
        self.task = model_task(model_dir, task)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(model_dir)
        auto_class = getattr(transformers, TASK_AUTO_CLASSES[self.task])
        self.model = auto_class.from_pretrained(model_dir).to(self.device).eval()
        self.metrics = ReplicaMetrics(name)
        self.batch_sizes: Counter[int] = Counter()
        self.engine = None
        if self.task == "causal_lm":
            self.engine = GenerationEngine(
                self.model, self.tokenizer, self.tokenizer.eos_token_id, max_batch_size, self.device,
                on_step=lambda n: self.metrics.batch_size("decode", n),
                on_first_token=self.metrics.time_to_first_token)
        for method in (self.classify_batch, self.fill_mask_batch, self.embed_batch):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)

    # ---------------------------------------------------------------------------------------- stats
    def stats(self) -> dict:
        sizes = dict(sorted(self.batch_sizes.items()))
        out = {"task": self.task, "device": self.device, "batch_sizes": sizes,
               "max_batch_size_seen": max(sizes, default=0), "batches": sum(sizes.values())}
        if self.engine is not None:
            out["generation"] = self.engine.stats()
        return out

    def _record(self, kind: str, n: int) -> None:
        self.batch_sizes[n] += 1
        self.metrics.batch_size(kind, n)

    # ---------------------------------------------------------------------------------- generation
    def _sequences(self, req: dict, queue: asyncio.Queue) -> list[Sequence]:
        """One engine sequence per (prompt, choice); a seeded request's choices get seeds seed, seed+1, ..."""
        loop = asyncio.get_running_loop()
        encoded = self.tokenizer(req["prompts"], add_special_tokens=req.get("add_special_tokens", True))["input_ids"]
        seqs = []
        for p_i, ids in enumerate(encoded):
            for j in range(req["n"]):
                index = p_i * req["n"] + j
                seed = None if req.get("seed") is None else req["seed"] + index
                seqs.append(Sequence(list(ids), req["max_tokens"], req["temperature"], req["top_p"], seed,
                                     req.get("top_logprobs"), bool(req.get("echo")), loop, queue, index=index))
        return seqs

    async def generate(self, req: dict) -> AsyncIterator[dict]:
        """Per-choice deltas `{index, text, logprobs}`, then `{index, finish_reason, prompt_tokens, completion_tokens}`.

        Text that could still become a stop sequence is held back; events that queued up while this consumer was
        busy go out as one delta (fewer, larger chunks under load)."""
        queue: asyncio.Queue = asyncio.Queue()
        seqs = self._sequences(req, queue)
        states = [ChoiceState(s, req["stop"]) for s in seqs]
        for s in seqs:
            self.engine.submit(s)
        open_choices, first = len(seqs), True
        try:
            while open_choices:
                events = [await queue.get()]
                # under load, one delta carries several tokens: each event costs every hop (replica -> ingress ->
                # proxy -> client) as much as a decode step, so events per second must not grow with the batch
                need = 1 if first else open_choices * max(1, self.engine.active // TOKENS_PER_EVENT_EVERY)
                while sum("token" in e for e in events) < need and not any("done" in e or "error" in e for e in events):
                    events.append(await queue.get())
                while not queue.empty():
                    events.append(queue.get_nowait())
                first = False
                for ev in events:
                    states[ev["index"]].take(ev)
                for state in states:
                    for out in state.drain():
                        if "finish_reason" in out:
                            open_choices -= 1
                            self.metrics.generated_tokens(out["completion_tokens"])
                        yield out
        finally:
            for s in seqs:
                s.cancelled.set()  # finished, or the client went away: the engine drops the rows next step

    async def complete(self, req: dict) -> list[dict]:
        """The whole answer: per choice its text, logprob entries, finish reason and token counts."""
        choices: dict[int, dict] = {}
        async for ev in self.generate(req):
            c = choices.setdefault(ev["index"], {"index": ev["index"], "text": "", "logprobs": []})
            c["text"] += ev.get("text", "")
            c["logprobs"] += ev.get("logprobs", [])
            c.update({k: v for k, v in ev.items() if k not in ("index", "text", "logprobs")})
        return [choices[i] for i in sorted(choices)]

    async def stream(self, req: dict) -> AsyncIterator[dict]:
        async for ev in self.generate(req):
            yield ev

    # -------------------------------------------------------------------------------- encoders
    def _encode(self, texts: list[str]):
        return self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(self.device)

    def _classify(self, reqs: list[dict]) -> list[list[dict]]:
        import torch

        texts = [t for r in reqs for t in r["inputs"]]
        with torch.inference_mode():
            probs = self.model(**self._encode(texts)).logits.float().softmax(-1).cpu()
        labels = self.model.config.id2label
        out, row = [], 0
        for r in reqs:
            items = []
            for _ in r["inputs"]:
                p = probs[row]
                row += 1
                best = int(p.argmax())
                item = {"label": labels[best], "score": float(p[best])}
                if r["return_all_scores"]:
                    item["scores"] = {labels[i]: float(p[i]) for i in range(len(p))}
                items.append(item)
            out.append(items)
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def classify_batch(self, reqs: list[dict]) -> list[list[dict]]:
        self._record("classify", len(reqs))
        return await asyncio.to_thread(self._classify, reqs)

    async def classify(self, req: dict) -> list[dict]:
        return await self.classify_batch(req)

    def _fill_mask(self, reqs: list[dict]) -> list[list[list[dict]]]:
        import torch

        texts = [t for r in reqs for t in r["inputs"]]
        enc = self._encode(texts)
        with torch.inference_mode():
            probs = self.model(**enc).logits.float().softmax(-1).cpu()
        mask_id = self.tokenizer.mask_token_id
        out, row = [], 0
        for r in reqs:
            per_input = []
            for _ in r["inputs"]:
                masks = []
                for pos in (enc["input_ids"][row] == mask_id).nonzero().flatten().tolist():
                    top = probs[row, pos].topk(r["top_k"])
                    masks.append([{"token": int(t), "token_str": self.tokenizer.decode([int(t)]).strip(),
                                   "score": float(s)} for s, t in zip(top.values, top.indices)])
                per_input.append(masks)
                row += 1
            out.append(per_input)
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def fill_mask_batch(self, reqs: list[dict]) -> list[list[list[dict]]]:
        self._record("fill_mask", len(reqs))
        return await asyncio.to_thread(self._fill_mask, reqs)

    async def fill_mask(self, req: dict) -> list[list[dict]]:
        return await self.fill_mask_batch(req)

    def _embed(self, reqs: list[dict]) -> list[dict]:
        """Mean of the last hidden states over real tokens, L2-normalized (sentence-transformers' recipe)."""
        import torch

        texts = [t for r in reqs for t in r["inputs"]]
        enc = self._encode(texts)
        with torch.inference_mode():
            out = self.model(**enc, output_hidden_states=True)
            hidden = out.hidden_states[-1].float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled, p=2, dim=-1).cpu()
        tokens = enc["attention_mask"].sum(-1).tolist()
        out_, row = [], 0
        for r in reqs:
            k = len(r["inputs"])
            out_.append({"embeddings": vectors[row:row + k].tolist(), "tokens": int(sum(tokens[row:row + k]))})
            row += k
        return out_

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def embed_batch(self, reqs: list[dict]) -> list[dict]:
        self._record("embed", len(reqs))
        return await asyncio.to_thread(self._embed, reqs)

    async def embed(self, req: dict) -> dict:
        return await self.embed_batch(req)


class InProcessModel:
    """A ModelServer in this process behind the calls the HTTP API makes on a deployment handle
    (`.options(stream=True).stream.remote(...)`, `await .complete.remote(...)`): one API, with or without a hop."""

    def __init__(self, server):
        self.server = server

    def options(self, **_) -> "InProcessModel":
        return self

    def __getattr__(self, method: str) -> "InProcessMethod":
        return InProcessMethod(getattr(self.server, method))


class InProcessMethod:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        return out if inspect.isawaitable(out) or inspect.isasyncgen(out) else _resolved(out)


async def _resolved(value):
    return value
