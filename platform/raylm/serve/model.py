"""The model deployment: loads a Hugging Face model directory and answers batched and streamed requests.

Only the task -> Auto class table comes from raylm's training code: any directory `transformers`' Auto classes can load is servable.
Requests arrive as plain dicts already validated by the ingress (`raylm.serve.api`).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any, AsyncIterator

from ray import serve

from raylm.train.models import TASK_AUTO_CLASSES  # task -> Auto class name (its one home)

# config.json `architectures` suffix -> task; the model's own head says what it can serve
ARCH_SUFFIX_TASKS: dict[str, str] = {
    "ForCausalLM": "causal_lm",
    "LMHeadModel": "causal_lm",
    "ForMaskedLM": "masked_lm",
    "ForSequenceClassification": "classification",
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


class _StopFlag:
    """A transformers StoppingCriteria set from another thread (client went away)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut `text` at the earliest stop sequence; True when one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


@serve.deployment
class ModelServer:
    """One replica: the model on CPU or GPU, dynamic batches for non-streaming routes, token streams for SSE."""

    def __init__(self, model_dir: str, task: str | None = None, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, num_threads: int | None = None):
        import torch
        import transformers

        from raylm.storage import materialize

        model_dir = str(materialize(model_dir))  # a URI: this replica's local copy, verified against the store
        if num_threads:
            torch.set_num_threads(num_threads)
        self.task = model_task(model_dir, task)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(model_dir)
        auto_class = getattr(transformers, TASK_AUTO_CLASSES[self.task])
        self.model = auto_class.from_pretrained(model_dir).to(self.device).eval()
        if self.task == "causal_lm":
            # left padding so a batch of prompts all continue from their last real token
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id = self.tokenizer.pad_token_id
        self.eos_id = self.tokenizer.eos_token_id
        # torch's global RNG is shared by threads: seeded sampling holds this lock so its draws are its own
        self.rng_lock = threading.Lock()
        self.batch_sizes: Counter[int] = Counter()
        for method in (self.complete_batch, self.classify_batch, self.fill_mask_batch):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)

    # ---------------------------------------------------------------------------------------- stats
    def stats(self) -> dict:
        sizes = dict(sorted(self.batch_sizes.items()))
        return {"task": self.task, "device": self.device, "batch_sizes": sizes,
                "max_batch_size_seen": max(sizes, default=0), "batches": sum(sizes.values())}

    def _record(self, n: int) -> None:
        self.batch_sizes[n] += 1

    # ---------------------------------------------------------------------------------- generation
    def _generate_kwargs(self, req: dict, max_new_tokens: int) -> dict:
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": self.pad_id,
                              "eos_token_id": self.eos_id}
        if req["temperature"] > 0:
            kw.update(do_sample=True, temperature=req["temperature"], top_p=req["top_p"], top_k=0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if req["stop"]:
            kw.update(stop_strings=req["stop"], tokenizer=self.tokenizer)
        return kw

    def _run_generate(self, req: dict, prompts: list[str], **extra) -> Any:
        """model.generate under the RNG lock when sampling (seeded from the request when it has a seed)."""
        import torch

        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        kw = self._generate_kwargs(req, req["max_tokens"]) | extra
        sampling = kw["do_sample"]
        with self.rng_lock if sampling else nullcontext(), torch.inference_mode():
            if sampling and req.get("seed") is not None:
                torch.manual_seed(req["seed"])
            out = self.model.generate(**enc, **kw)
        return enc, out

    def _complete_group(self, reqs: list[dict]) -> list[list[dict]]:
        """One generate call for requests sharing sampling settings; each gets its n choices per prompt."""
        head = reqs[0]
        n = head["n"]
        prompts = [p for r in reqs for p in r["prompts"]]
        # greedy choices are identical: decode once and copy; sampling draws n sequences per prompt
        copies = n if head["temperature"] > 0 else 1
        enc, out = self._run_generate(head, prompts, num_return_sequences=copies)
        prompt_len = enc["input_ids"].shape[1]
        prompt_tokens = enc["attention_mask"].sum(-1).tolist()
        results, g = [], 0  # g: index of the prompt across the whole group; out rows are prompt-major
        for r in reqs:
            choices = []
            for p_i in range(len(r["prompts"])):
                seqs = [self._finish(out[g * copies + k, prompt_len:], r) for k in range(copies)]
                seqs = seqs * n if copies == 1 else seqs
                for j, (text, finish, n_gen) in enumerate(seqs):
                    choices.append({"text": text, "index": p_i * n + j, "finish_reason": finish,
                                    "prompt_tokens": int(prompt_tokens[g]), "completion_tokens": n_gen})
                g += 1
            results.append(choices)
        return results

    def _finish(self, new_ids, req: dict) -> tuple[str, str, int]:
        ids = new_ids.tolist()
        hit_eos = self.eos_id in ids
        if hit_eos:
            ids = ids[: ids.index(self.eos_id)]
        n_gen = len(ids) + int(hit_eos)
        text, hit_stop = truncate_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), req["stop"])
        finish = "stop" if hit_eos or hit_stop or n_gen < req["max_tokens"] else "length"
        return text, finish, n_gen

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def complete_batch(self, reqs: list[dict]) -> list[list[dict]]:
        self._record(len(reqs))
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            # a seeded request is its own group: its draws must not depend on who it was batched with
            key = (r["max_tokens"], r["temperature"], r["top_p"], tuple(r["stop"]), r["n"],
                   i if r.get("seed") is not None else None)
            groups.setdefault(key, []).append(i)
        results: list[list[dict]] = [[] for _ in reqs]
        for idxs in groups.values():
            group = [reqs[i] for i in idxs]
            for i, res in zip(idxs, await asyncio.to_thread(self._complete_group, group)):
                results[i] = res
        return results

    async def complete(self, req: dict) -> list[dict]:
        return await self.complete_batch(req)

    async def stream(self, req: dict) -> AsyncIterator[dict]:
        """Yield `{index, text}` deltas, then `{index, finish_reason, ...}` per choice, as tokens are made."""
        from transformers import AsyncTextIteratorStreamer

        n = req["n"]
        for p_i, prompt in enumerate(req["prompts"]):
            for j in range(n):
                streamer = AsyncTextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
                stop_flag = _StopFlag()
                counted: dict[str, Any] = {}

                def work(prompt=prompt, streamer=streamer, stop_flag=stop_flag, counted=counted):
                    from transformers import StoppingCriteriaList

                    try:
                        enc, out = self._run_generate(req, [prompt], streamer=streamer,
                                                      stopping_criteria=StoppingCriteriaList([stop_flag]))
                        counted["prompt"] = int(enc["attention_mask"].sum())
                        counted["finish"] = self._finish(out[0, enc["input_ids"].shape[1]:], req)
                    except BaseException as e:  # noqa: BLE001 - surfaced to the stream below
                        counted["error"] = e
                        streamer.end()

                thread = threading.Thread(target=work, daemon=True)
                thread.start()
                text, sent = "", 0
                hold = max((len(s) for s in req["stop"]), default=1) - 1
                try:
                    async for piece in streamer:
                        text += piece
                        cut, hit = truncate_at_stop(text, req["stop"])
                        # hold back a tail that could still become a stop sequence
                        upto = len(cut) if hit else max(sent, len(text) - hold)
                        if upto > sent:
                            yield {"index": p_i * n + j, "text": cut[sent:upto]}
                            sent = upto
                        if hit:
                            stop_flag.event.set()
                            break
                finally:
                    stop_flag.event.set()
                    await asyncio.to_thread(thread.join)
                if "error" in counted:
                    raise counted["error"]
                final_text, finish, n_gen = counted["finish"]
                if len(final_text) > sent:
                    yield {"index": p_i * n + j, "text": final_text[sent:]}
                yield {"index": p_i * n + j, "finish_reason": finish, "prompt_tokens": counted["prompt"],
                       "completion_tokens": n_gen}

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
        self._record(len(reqs))
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
        self._record(len(reqs))
        return await asyncio.to_thread(self._fill_mask, reqs)

    async def fill_mask(self, req: dict) -> list[list[dict]]:
        return await self.fill_mask_batch(req)

