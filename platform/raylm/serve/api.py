"""The HTTP API: a FastAPI app (OpenAI-compatible completions, chat, embeddings; classify, fill-mask) in front of
ModelServer, in each model replica (`ModelServerWithApi`, the default) or as its own deployment (`Ingress`).

Every client mistake becomes a 4xx `{"error": {"message", "type"}}`; limits, auth and the body-size cap are
checked here so the model replicas only ever see valid work.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from typing import Annotated, Any, Literal

import numpy as np

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator
from ray import serve
from starlette.exceptions import HTTPException

from raylm.serve.engine import MAX_TOP_LOGPROBS
from raylm.serve.model import ENCODER_TASKS, InProcessModel, ModelServer, context_length, load_tokenizer, model_task

log = logging.getLogger("ray.serve")

# route -> the tasks it serves; a mismatch is a 400 that names the served task and its route
ROUTE_TASKS: dict[str, tuple[str, ...]] = {"/v1/completions": ("causal_lm",), "/v1/chat/completions": ("causal_lm",),
                                           "/v1/classify": ("classification",), "/v1/fill-mask": ("masked_lm",),
                                           "/v1/embeddings": ENCODER_TASKS}
# task -> its main route (named in errors and /healthz)
TASK_ROUTES = {"causal_lm": "/v1/completions", "classification": "/v1/classify", "masked_lm": "/v1/fill-mask",
               "embedding": "/v1/embeddings"}
ERROR_TYPES: dict[int, str] = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                               405: "invalid_request_error", 413: "request_too_large", 503: "overloaded_error"}
OPEN_PATHS = ("/healthz",)  # reachable without the API key (load balancer probes)
# caps on one request's work, beyond the body-size cap: a single request must not be able to exhaust a replica
MAX_PROMPTS = 64  # prompts in one completions request
MAX_CHOICES = 64  # prompts x n sequences generated for one request
MAX_MESSAGES = 256  # chat messages in one request
MAX_JSON_DEPTH = 32  # nesting of arrays/objects in a request body
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes


# ------------------------------------------------------------------------------------------ requests
class ApiRequest(BaseModel):
    # unknown OpenAI fields (user, logprobs, echo, ...) are accepted and ignored, as clients send them
    model_config = ConfigDict(extra="ignore")
    model: str | None = None


class SamplingRequest(ApiRequest):
    """What completions and chat share: sampling, stop sequences, choices, streaming."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("max_tokens", "n", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("must be an integer")
        return v


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="top alternatives per token")
    echo: StrictBool = False

    @field_validator("logprobs", mode="before")
    @classmethod
    def _int_logprobs(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"must be an integer from 0 to {MAX_TOP_LOGPROBS}")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class EmbeddingRequest(ApiRequest):
    input: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                            Field(min_length=1, max_length=256)]
    encoding_format: Literal["float", "base64"] = "float"


class ClassifyRequest(ApiRequest):
    inputs: Annotated[list[str], Field(min_length=1, max_length=256)]
    return_all_scores: StrictBool = False


class FillMaskRequest(ApiRequest):
    inputs: Annotated[list[str], Field(min_length=1, max_length=256)]
    top_k: int = Field(5, ge=1, le=100)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_ or ERROR_TYPES.get(status, "invalid_request_error")
        self.param, self.code = param, code


# error types that are specific enough to be OpenAI's `code` as well
ERROR_CODES = {"context_length_exceeded", "model_not_found", "request_too_large"}


def error_response(status: int, message: str, type_: str | None = None, headers: dict | None = None,
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    """OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`."""
    type_ = type_ or ERROR_TYPES.get(status, "invalid_request_error")
    code = code or (type_ if type_ in ERROR_CODES else None)
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def load_api_keys(api_key_env: str | None, api_keys_env: str | None) -> list[str]:
    """The accepted API keys: `serve.api_key_env` (a variable holding one key) and `serve.api_keys_env` (a variable
    holding keys one per line, or a file path: one key per line; blank lines and `#` comments ignored). Raises
    ConfigError naming the key when a source is missing or holds no key; the keys themselves are never echoed."""
    import os

    from raylm.config import ConfigError

    keys: list[str] = []
    if api_key_env:
        if not os.environ.get(api_key_env, "").strip():
            raise ConfigError("serve.api_key_env", f"environment variable {api_key_env} is not set")
        keys.append(os.environ[api_key_env].strip())
    if api_keys_env:
        if "/" in api_keys_env or api_keys_env.startswith("~"):
            path = os.path.expanduser(api_keys_env)
            try:
                with open(path) as f:
                    text = f.read()
            except OSError as e:
                raise ConfigError("serve.api_keys_env", f"cannot read the key file {api_keys_env}: {e.strerror}") from None
        elif api_keys_env in os.environ:
            text = os.environ[api_keys_env]
        else:
            raise ConfigError("serve.api_keys_env", f"environment variable {api_keys_env} is not set")
        found = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise ConfigError("serve.api_keys_env", f"{api_keys_env} holds no key (one per line)")
        keys += found
    return keys


def key_matches(token: str, digests: list[bytes]) -> bool:
    """Constant time in the token and in which key matched: every digest is compared, no early exit."""
    seen = key_digest(token)
    ok = False
    for d in digests:
        ok |= hmac.compare_digest(seen, d)
    return ok


def json_problem(body: bytes) -> str | None:
    """Why a JSON request body is refused before FastAPI parses it: bytes that are not UTF-8, nesting deeper than
    MAX_JSON_DEPTH, NaN/Infinity (not JSON, though Python's parser takes them), or invalid JSON."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"request body is not UTF-8 text (invalid byte at offset {e.start})"
    brackets = re.sub(r"[^\[\]{}]", "", re.sub(r'"(?:[^"\\]|\\.)*"', "", text))
    depth = deepest = 0
    for c in brackets:
        depth += 1 if c in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_JSON_DEPTH:
        return f"request body nests {deepest} levels deep; the limit is {MAX_JSON_DEPTH}"

    def refuse(constant: str):
        raise ValueError(f"{constant} is not a JSON number")

    try:
        json.loads(text, parse_constant=refuse)
    except (ValueError, RecursionError) as e:
        return f"request body is not valid JSON: {e}"
    return None


# ----------------------------------------------------------------------------------------- middleware
class GuardMiddleware:
    """Pure ASGI: Bearer auth (constant-time, any of several keys), body-size cap (413, chunked bodies too),
    JSON bodies sent as forms (curl -d), and JSON the API refuses before parsing (non-UTF-8, NaN, deep nesting).
    Bodies are never logged unless `log_bodies` (prompts may hold secrets)."""

    def __init__(self, app, max_bytes: int, digests: list[bytes] | None, log_bodies: bool = False):
        self.app, self.max_bytes, self.digests, self.log_bodies = app, max_bytes, digests, log_bodies

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "").rstrip("/")) or "/"
        headers = {k.lower(): v for k, v in scope["headers"]}
        if self.digests and path not in OPEN_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            # compare digests of equal length in constant time; the key itself is never logged or echoed
            if scheme.lower() != "bearer" or not key_matches(token.strip(), self.digests):
                return await error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                            headers={"WWW-Authenticate": "Bearer"},
                                            code="invalid_api_key")(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await error_response(413, f"request body over {self.max_bytes} bytes")(scope, receive, send)
        if scope["method"] == "POST" and headers.get(b"content-type", b"").split(b";")[0] in (
                b"", b"application/x-www-form-urlencoded"):
            # `curl -d '{...}'` labels JSON as a form: a JSON API reads it as the JSON it is
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                         + [(b"content-type", b"application/json")])
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # read the whole body first (up to the cap), so an oversized chunked body is a 413 before any route runs
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                return await error_response(413, f"request body over {self.max_bytes} bytes")(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        content_type = dict((k.lower(), v) for k, v in scope["headers"]).get(b"content-type", b"")
        if content_type.split(b";")[0].strip() == b"application/json":
            problem = json_problem(body)
            if problem:
                return await error_response(400, problem)(scope, receive, send)
        if self.log_bodies:  # opt-in (serve.log_request_bodies): prompts can carry personal data or secrets
            log.info("request %s %s body: %s", scope["method"], path, body[:2000].decode("utf-8", "replace"))
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect, as Starlette expects
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def main_error(exc: RequestValidationError) -> dict:
    """The error to report: for a union field (`prompt`: string or list) the constraint that failed, not
    "should be a valid string" from the member it was never meant to be."""
    errors = exc.errors()
    return next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])


def validation_param(exc: RequestValidationError) -> str | None:
    """The request field an error concerns (OpenAI's `param`), e.g. `prompt` or `messages.0.role`."""
    loc = [str(p) for p in main_error(exc).get("loc", ()) if p != "body"]
    # drop pydantic's union-member names (e.g. "str", "list[str]") from the location
    loc = [p for p in loc if not p.startswith(("list[", "str", "function-", "int", "constrained"))]
    return ".".join(loc) or None


def validation_message(exc: RequestValidationError) -> str:
    err = main_error(exc)
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
    loc = validation_param(exc)
    return f"{loc}: {err['msg']}" if loc else err["msg"]


# ------------------------------------------------------------------------------------------ ingress
class HttpApi:
    """Validates, authenticates and routes HTTP requests to `model`: the model deployment's handle, or a ModelServer
    in this replica behind the same calls (`InProcessModel`)."""

    def __init__(self, model, name: str, model_dir: str, task: str | None = None, max_prompt_tokens: int = 1024,
                 max_new_tokens: int = 256, max_request_bytes: int = 1_000_000, api_key_sha256: str | None = None,
                 api_key_env: str | None = None, api_keys_env: str | None = None, log_request_bodies: bool = False):
        import os

        from raylm.storage import materialize

        model_dir = str(materialize(model_dir))  # one version: a versioned dir resolved once, a URI verified
        self.model = model
        self.name = name
        self.task = model_task(model_dir, task)
        self.tokenizer = load_tokenizer(model_dir)
        self.context = context_length(model_dir)
        self.max_prompt_tokens, self.max_new_tokens, self.max_request_bytes = (
            max_prompt_tokens, max_new_tokens, max_request_bytes)
        self.log_request_bodies = log_request_bodies
        # digests of the accepted keys, comma-separated, from the driver; else (serveConfigV2 on a cluster) the keys
        # reach replicas as env vars or a mounted file, e.g. from a Kubernetes Secret
        self.digests: list[bytes] = [bytes.fromhex(h) for h in (api_key_sha256 or "").split(",") if h]
        if not self.digests and (api_key_env or api_keys_env):
            self.digests = [key_digest(k) for k in load_api_keys(api_key_env, api_keys_env)]

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    # -------------------------------------------------------------------------------------- checks
    def check(self, route: str, model: str | None) -> None:
        if self.task not in ROUTE_TASKS[route]:
            raise ApiError(400, f"{route} needs a {' or '.join(ROUTE_TASKS[route])} model; this server serves "
                                f"{self.name!r}, a {self.task} model: use {TASK_ROUTES[self.task]}")
        if model is not None and model != self.name:
            raise ApiError(404, f"model {model!r} is not served here; the served model is {self.name!r}",
                           "model_not_found")

    def count_tokens(self, texts: list[str], what: str) -> list[int]:
        counts = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for i, n in enumerate(counts):
            if n > self.max_prompt_tokens:
                raise ApiError(400, f"{what}[{i}] has {n} tokens; the limit is max_prompt_tokens={self.max_prompt_tokens}",
                               "context_length_exceeded")
        return counts

    def completion_job(self, body: CompletionRequest) -> dict:
        self.check("/v1/completions", body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        job = self.generation_job(body, prompts, body.max_tokens, "prompt")
        return {**job, "top_logprobs": body.logprobs, "echo": body.echo}

    def chat_job(self, body: ChatRequest) -> dict:
        self.check("/v1/chat/completions", body.model)
        if not self.tokenizer.chat_template:
            raise ApiError(400, f"model {self.name!r} has no chat_template in its tokenizer files: set "
                                "model.chat_template and export it again, or use /v1/completions")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template may reject a conversation (e.g. roles out of order)
            raise ApiError(400, f"messages: the model's chat_template rejected them: {e}") from None
        max_tokens = body.max_completion_tokens or body.max_tokens or self.max_new_tokens
        job = self.generation_job(body, [prompt], max_tokens, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        # the template writes the special tokens itself
        return {**job, "top_logprobs": top, "echo": False, "add_special_tokens": False}

    def generation_job(self, body: SamplingRequest, prompts: list[str], max_tokens: int, what: str) -> dict:
        if len(prompts) * body.n > MAX_CHOICES:  # one request must not occupy a replica with hundreds of sequences
            raise ApiError(400, f"{len(prompts)} prompts x n={body.n} asks for {len(prompts) * body.n} sequences; "
                                f"the limit is {MAX_CHOICES} per request", param="n")
        if max_tokens > self.max_new_tokens:
            raise ApiError(400, f"max_tokens={max_tokens} is over the limit max_new_tokens={self.max_new_tokens}",
                           param="max_tokens")
        counts = self.count_tokens(prompts, what)
        start = self.tokenizer.bos_token or self.tokenizer.eos_token or ""
        # an empty prompt starts from the document separator, as OpenAI's models do
        prompts = [p if n else start for p, n in zip(prompts, counts)]
        if self.context is not None:
            longest = max(max(counts), 1)
            if longest >= self.context:
                raise ApiError(400, f"prompt has {longest} tokens; the model's context is {self.context} tokens",
                               "context_length_exceeded")
            max_tokens = min(max_tokens, self.context - longest)  # generation stops at the context's end
        stop = [body.stop] if isinstance(body.stop, str) else [s for s in body.stop or [] if s]
        return {"prompts": prompts, "max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                "stop": stop, "n": body.n, "seed": body.seed}

    def usage(self, choices: list[dict], n: int) -> dict:
        prompt_tokens = sum(c["prompt_tokens"] for c in choices if c["index"] % n == 0)
        completion_tokens = sum(c["completion_tokens"] for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


@serve.deployment
@serve.ingress()
class Ingress(HttpApi):
    """The HTTP API as its own deployment (`serve.ingress_replicas` >= 1), in front of the model deployment."""


@serve.deployment(name="ModelServer")
@serve.ingress()
class ModelServerWithApi(HttpApi):
    """The HTTP API inside each model replica (`serve.ingress_replicas: 0`): a request takes one hop (proxy to
    replica), not two, and the API scales with the model's autoscaling."""

    def __init__(self, model_args: dict, **api_args):
        # the API loads its own tokenizer: the server's encoder threads set truncation state on the server's one
        super().__init__(InProcessModel(ModelServer.func_or_class(**model_args)), **api_args)


def build_api(ingress: HttpApi) -> FastAPI:
    """The FastAPI app of one ingress replica (built on the replica, so it closes over its settings)."""
    app = FastAPI(title="raylm", description=f"Serving {ingress.name} ({ingress.task}) on Ray Serve",
                  version="0.1.0")
    app.add_middleware(GuardMiddleware, max_bytes=ingress.max_request_bytes, digests=ingress.digests,
                       log_bodies=ingress.log_request_bodies)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(400, validation_message(exc), param=validation_param(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        from ray.serve.exceptions import BackPressureError

        if isinstance(exc, BackPressureError):
            return error_response(503, "the model is overloaded; retry shortly")
        log.exception("request failed: %s %s", request.method, request.url.path)
        return error_response(500, "internal server error; see the Ray Serve replica logs", "server_error")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "model": ingress.name, "task": ingress.task,
                "route": TASK_ROUTES[ingress.task], "replica": await ingress.model.stats.remote()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": ingress.name, "object": "model", "created": 0,
                                            "owned_by": "raylm", "task": ingress.task}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        job = ingress.completion_job(body)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": ingress.name}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(sse_events(ingress, job, meta, include_usage, CompletionChunks(job)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices = await ingress.model.complete.remote(job)
        want = job["top_logprobs"] is not None
        return {**meta, "choices": [{"text": c["text"], "index": c["index"],
                                     "logprobs": completion_logprobs(c["logprobs"], 0) if want else None,
                                     "finish_reason": c["finish_reason"]} for c in choices],
                "usage": ingress.usage(choices, job["n"])}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        job = ingress.chat_job(body)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": ingress.name}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            chunks = ChatChunks(job)
            return StreamingResponse(sse_events(ingress, job, {**meta, "object": "chat.completion.chunk"},
                                                include_usage, chunks),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices = await ingress.model.complete.remote(job)
        want = job["top_logprobs"] is not None
        return {**meta, "choices": [{"index": c["index"],
                                     "message": {"role": "assistant", "content": c["text"], "refusal": None},
                                     "logprobs": chat_logprobs(c["logprobs"]) if want else None,
                                     "finish_reason": c["finish_reason"]} for c in choices],
                "usage": ingress.usage(choices, job["n"])}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict:
        ingress.check("/v1/embeddings", body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        ingress.count_tokens(texts, "input")
        result = await ingress.model.embed.remote({"inputs": texts})

        def encode(vector: list[float]):
            if body.encoding_format == "base64":  # OpenAI's: little-endian float32 bytes
                return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
            return vector

        return {"object": "list", "model": ingress.name,
                "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                         for i, v in enumerate(result["embeddings"])],
                "usage": {"prompt_tokens": result["tokens"], "total_tokens": result["tokens"]}}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict:
        ingress.check("/v1/classify", body.model)
        ingress.count_tokens(body.inputs, "inputs")
        results = await ingress.model.classify.remote({"inputs": body.inputs,
                                                       "return_all_scores": body.return_all_scores})
        return {"model": ingress.name, "results": results}

    @app.post("/v1/fill-mask")
    async def fill_mask(body: FillMaskRequest) -> dict:
        ingress.check("/v1/fill-mask", body.model)
        mask = ingress.tokenizer.mask_token
        for i, text in enumerate(body.inputs):
            if mask not in text:
                raise ApiError(400, f"inputs[{i}] has no {mask} token to fill")
        ingress.count_tokens(body.inputs, "inputs")
        results = await ingress.model.fill_mask.remote({"inputs": body.inputs, "top_k": body.top_k})
        return {"model": ingress.name, "mask_token": mask, "results": results}

    return app


def completion_logprobs(entries: list[dict], offset: int) -> dict:
    """Legacy completions' shape: parallel lists of tokens, logprobs, top alternatives and text offsets."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["logprob"] is None else dict(e["top"]) for e in entries],
            "text_offset": offsets}


def chat_logprobs(entries: list[dict]) -> dict:
    """Chat's shape: one object per token with its bytes and its top alternatives."""
    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**item(e["token"], e["logprob"]), "top_logprobs": [item(t, lp) for t, lp in e["top"]]}
                        for e in entries], "refusal": None}


class CompletionChunks:
    """Text-completion stream chunks (`choices[].text`), with logprobs text offsets running on per choice."""

    def __init__(self, job: dict):
        self.want = job["top_logprobs"] is not None
        self.offsets: dict[int, int] = {}

    def opening(self, n_choices: int) -> list[dict]:
        return []

    def delta(self, ev: dict) -> dict:
        logprobs = None
        if self.want:
            offset = self.offsets.get(ev["index"], 0)
            logprobs = completion_logprobs(ev["logprobs"], offset)
            self.offsets[ev["index"]] = offset + sum(len(e["token"]) for e in ev["logprobs"])
        return {"text": ev["text"], "index": ev["index"], "logprobs": logprobs, "finish_reason": None}

    def finish(self, ev: dict) -> dict:
        return {"text": "", "index": ev["index"], "logprobs": None, "finish_reason": ev["finish_reason"]}


class ChatChunks:
    """Chat stream chunks: a role delta per choice first, then content deltas, then an empty finish delta."""

    def __init__(self, job: dict):
        self.want = job["top_logprobs"] is not None

    def opening(self, n_choices: int) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(n_choices)]

    def delta(self, ev: dict) -> dict:
        return {"index": ev["index"], "delta": {"content": ev["text"]},
                "logprobs": chat_logprobs(ev["logprobs"]) if self.want else None, "finish_reason": None}

    def finish(self, ev: dict) -> dict:
        return {"index": ev["index"], "delta": {}, "logprobs": None, "finish_reason": ev["finish_reason"]}


async def sse_events(ingress: HttpApi, job: dict, meta: dict, include_usage: bool, chunks):
    """OpenAI-style server-sent events: one `data: {chunk}` per delta, a finish chunk per choice, then `[DONE]`."""

    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    finished: list[dict] = []
    try:
        for choice in chunks.opening(len(job["prompts"]) * job["n"]):
            yield event({**meta, "choices": [choice]})
        async for ev in ingress.model.options(stream=True).stream.remote(job):
            if "finish_reason" in ev:
                finished.append(ev)
                yield event({**meta, "choices": [chunks.finish(ev)]})
            elif ev["text"] or ev["logprobs"]:
                yield event({**meta, "choices": [chunks.delta(ev)]})
        if include_usage:
            yield event({**meta, "choices": [], "usage": ingress.usage(finished, job["n"])})
    except Exception:  # noqa: BLE001 - the status line is sent; report in-band, then close the stream
        log.exception("stream failed")
        yield event({"error": {"message": "generation failed; see the Ray Serve replica logs", "type": "server_error"}})
    yield "data: [DONE]\n\n"
