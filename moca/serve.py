"""Serve embeddings over HTTP: `python -m moca.serve` (FastAPI + uvicorn).

    python -m moca.serve                                   # tiny preset on 127.0.0.1:8080
    python -m moca.serve --model CKPT --host 0.0.0.0 --port 8080 --dtype bfloat16

Endpoints: OpenAI-compatible `POST /v1/embeddings` (and `/embeddings`), TEI-compatible `POST /embed`
(and `POST /`, `GET /info`), `GET /health` (and `/ping`; 200 once warm, 503 before) and `GET /metrics`
(Prometheus). An input is a string or an object `{"text": ..., "image": <base64 or data URL>}` (or
`"images": [...]`); a text that names no image with a marker gets one marker per image in front of it,
as in MoCa's prompts; a text without images is taken as it is. Token-id inputs are refused: a client's
ids (tiktoken's, for LangChain) are not this model's.

Design decisions a reader must know:
* One dedicated device thread owns the model. Requests are decoded (base64, image decode,
  resize, tokenise) in a thread pool off the event loop, then their samples wait in a queue;
  each round the device thread takes everything waiting, packs it under the token budget with
  the packer `embed_items` uses (`host_ops.pack_bins`, then `Processor.pack`: no padding) and
  runs one forward per bin. Each sample attends only to itself, so a vector does not depend on
  what it was batched with: it equals `model.embed` of that input alone.
* Back-pressure: at most `--max-queue` requests are admitted at once (then 503 + Retry-After; TEI's
  429), counted once their body has arrived (a slow upload holds no slot); a request over
  `--max-request-tokens` or `--max-client-batch-size` inputs, or a body over `--payload-limit`, is refused
  with 413, a body slower than `--body-timeout` with 408; a malformed request gets 400 naming the field and
  index (TEI's 422). Each API gets its own error shape (OPENAI_ERRORS, TEI_ERRORS). A client that
  disconnects (uploading or queued) cancels its inputs (status 499 in /metrics); the batch goes on.
* With `--api-key`, every route but /health and /ping wants `Authorization: Bearer <key>` (TEI's --api-key;
  OpenAI's clients send it): 401 in the API's error shape, checked before the body is read.
* Vectors leave the device pooled and are normalised per request (TEI's normalize=false skips it).
* Warm start: before /health reports ready the device thread embeds a few representative inputs
  (texts, an image, interleaved) alone and together, so the first request pays no compile or
  autotune stall.
"""

import argparse
import asyncio
import base64
import binascii
import contextlib
import copy
import hmac
import json
import logging
import os
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import uvicorn
from fastapi import FastAPI, Request
from starlette.requests import ClientDisconnect
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from moca import host_ops
from moca.batch import Sample
from moca.embed import demo_items, image_size, item_cost, run_cli, sample_cost
from moca.image import ImageError, load_image
from moca.processor import (COUNT, IMAGE_MARKER, IMAGE_PAD, POSITIVE, Processor, add_image_tokens_arg, bounded,
                            device_arg, normalize_markers)

log = logging.getLogger("moca")


# A refusal's kind -> (HTTP status, error type) in each API: OpenAI's error types, and TEI's router
# (text-embeddings-inference: Validation 422, Empty 400, 413 over a size limit, Overloaded 429,
# Unhealthy 503, Backend 424).
OPENAI_ERRORS = {"invalid": (400, "invalid_request_error"), "empty": (400, "invalid_request_error"),
                 "too_large": (413, "invalid_request_error"), "timeout": (408, "invalid_request_error"),
                 "unauthorized": (401, "invalid_request_error"),
                 "overloaded": (503, "server_overloaded"),
                 "unavailable": (503, "server_error"), "backend": (500, "server_error")}
TEI_ERRORS = {"invalid": (422, "Validation"), "empty": (400, "Empty"), "too_large": (413, "Validation"),
              "timeout": (408, "Validation"), "unauthorized": (401, "Unauthorized"),
              "overloaded": (429, "Overloaded"), "unavailable": (503, "Unhealthy"), "backend": (424, "Backend")}


class RequestError(ValueError):
    """A request the server refuses: its kind (a key of OPENAI_ERRORS), a message that names the field at
    fault, that field (`param`, None when the request as a whole is at fault)."""

    def __init__(self, kind: str, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.kind, self.param, self.headers = kind, param, headers or {}


class ClientGone(Exception):
    """The client disconnected before its vectors were ready; its inputs were cancelled."""


# ------------------------------------------------------------------------------- request parsing
def parse_json(body: bytes) -> dict:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError("invalid", f"request body is not valid JSON: {e}") from None
    if not isinstance(payload, dict):
        raise RequestError("invalid", f"request body must be a JSON object, got {type(payload).__name__}")
    return payload


def _text(value: str, field: str) -> str:
    """A text field that encodes (JSON can carry lone surrogates, which no tokenizer takes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError("invalid", f"{field}: not valid Unicode text ({e.reason} at {e.start})", field) from None
    return value


def parse_inputs(value, field: str) -> list[tuple[str, str, list]]:
    """The `input`/`inputs` value -> [(field name, text, [(image field name, encoded image), ...])]."""
    if value is None:
        raise RequestError("invalid", f"{field}: required", field)
    single = not isinstance(value, list)
    values = [value] if single else value
    if not values:
        raise RequestError("empty", f"{field}: must not be empty", field)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values) or any(isinstance(v, list) for v in values):
        raise RequestError("invalid", f"{field}: token ids are not accepted (a client's ids, e.g. tiktoken's, mean "
                                      "nothing to this model's tokenizer): send text (LangChain's OpenAIEmbeddings: "
                                      "check_embedding_ctx_length=False)", field)
    out = []
    for i, v in enumerate(values):
        name = field if single else f"{field}[{i}]"
        if isinstance(v, str):
            if not v:
                raise RequestError("empty", f"{name}: empty text", name)
            out.append((name, _text(v, name), []))
            continue
        if not isinstance(v, dict) or not ({"text", "image", "images"} & v.keys()):
            raise RequestError("invalid", f"{name}: expected a string or an object with 'text' and/or 'image', "
                                          f"got {type(v).__name__}", name)
        text = v.get("text") or ""
        if not isinstance(text, str):
            raise RequestError("invalid", f"{name}.text: expected a string, got {type(text).__name__}", f"{name}.text")
        if "image" in v and "images" in v:
            raise RequestError("invalid", f"{name}: give 'image' or 'images', not both", name)
        if "images" in v:
            if not isinstance(v["images"], list):
                raise RequestError("invalid", f"{name}.images: expected a list, got {type(v['images']).__name__}",
                                   f"{name}.images")
            images = [(f"{name}.images[{k}]", img) for k, img in enumerate(v["images"])]
        else:
            images = [(f"{name}.image", v["image"])] if v.get("image") is not None else []
        if not text and not images:
            raise RequestError("empty", f"{name}: no text and no image", name)
        out.append((name, _text(text, f"{name}.text"), images))
    return out


def image_bytes(value, field: str) -> bytes:
    """Base64 (padded or not) or a `data:<type>;base64,` URL -> the image file's bytes (not yet decoded: its
    header alone gives its cost); RequestError naming `field`."""
    if not isinstance(value, str):
        raise RequestError("invalid", f"{field}: expected a base64 string or data URL, got {type(value).__name__}",
                           field)
    if value.lower().startswith(("http://", "https://")):
        raise RequestError("invalid", f"{field}: image URLs are not fetched; send the image as base64 or a data URL",
                           field)
    data = value
    if value[:5].lower() == "data:":
        head, sep, data = value.partition(",")
        if not sep or not head.lower().endswith(";base64"):
            raise RequestError("invalid", f"{field}: a data URL must look like 'data:image/png;base64,<data>'", field)
    data = "".join(data.split())
    try:
        raw = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError("invalid", f"{field}: not valid base64 ({e})", field) from None
    try:
        image_size(raw)  # the header: the format and size, what the cost needs
    except ImageError as e:
        raise RequestError("invalid", f"{field}: {e}", field) from None
    return raw


# ------------------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics in a registry of their own (several servers may live in one process)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("moca_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.queued = Counter("moca_queued_inputs", "inputs handed to the device thread", registry=r)
        self.inputs = Counter("moca_inputs", "inputs embedded and answered", registry=r)
        self.tokens = Counter("moca_tokens", "LLM tokens embedded (image tokens included)", registry=r)
        self.queue_depth = Gauge("moca_queue_depth", "requests admitted and not yet answered", registry=r)
        self.uploading = Gauge("moca_uploading", "requests whose body is still arriving (they hold no queue slot)",
                               registry=r)
        self.batch_inputs = Histogram("moca_batch_inputs", "inputs per forward", registry=r,
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.batch_tokens = Histogram("moca_batch_tokens", "LLM tokens plus image patches per forward", registry=r,
                                      buckets=tuple(2**k for k in range(6, 18)))
        self.forward_seconds = Histogram("moca_forward_seconds", "time of one forward (pack, copy, model, copy back)", registry=r,
                                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.latency = Histogram("moca_request_latency_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))


# ------------------------------------------------------------------------------- device worker
@dataclass
class _Job:
    sample: Sample
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


def _settle(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():  # cancelled: the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class DeviceWorker:
    """The one thread that runs the model: take everything waiting, pack it, one forward per bin.

    `lock` is held for each round (from draining the queue to the last forward) and for the
    warm-up; whoever else touches the model holds it too. Holding it stalls the worker with the
    queue filling up behind it, which is how the tests make batches and overload deterministic.
    """

    def __init__(self, model, processor: Processor, metrics: Metrics, batch_tokens: int, max_items: int = 0,
                 pooling: str = "mean", warmup: bool = True):
        self.model, self.processor, self.metrics = model, processor, metrics
        self.batch_tokens, self.max_items, self.pooling, self.warmup = batch_tokens, max_items, pooling, warmup
        self.device, self.dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="moca-device", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, samples: list[Sample], loop: asyncio.AbstractEventLoop) -> list[asyncio.Future]:
        futures = [loop.create_future() for _ in samples]
        for s, f in zip(samples, futures):
            self._jobs.put(_Job(s, f, loop))
        self.metrics.queued.inc(len(samples))
        return futures

    @torch.inference_mode()
    def forward(self, samples: list[Sample]) -> torch.Tensor:
        """One packed forward -> (len(samples), hidden) float32 pooled vectors on the host, not yet normalised
        (the request says whether to)."""
        batch = self.processor.pack(samples).to(self.device)
        return self.model.embed(batch, pooling=self.pooling, normalize=False).cpu()

    def _warm_up(self) -> None:
        items, _ = demo_items()
        samples = [self.processor.encode(it) for it in items]
        t0 = time.perf_counter()
        for s in samples:
            self.forward([s])
        self.forward(samples)
        log.info("warm-up: %d inputs alone and together in %.2f s", len(samples), time.perf_counter() - t0)

    def _run(self) -> None:
        try:
            self._serve()
        except Exception:  # the warm-up failed (out of memory, a broken checkpoint): /health says so from now on
            log.exception("the device worker stopped")
        finally:  # stopped, or failed: nobody would answer what is queued
            with contextlib.suppress(queue.Empty):
                while True:
                    job = self._jobs.get_nowait()
                    if job is not None:
                        job.loop.call_soon_threadsafe(_settle, job.future, None, RequestError(
                            "unavailable", "the device worker has stopped (see the server log)"))

    def _serve(self) -> None:
        if self.warmup:
            with self.lock:
                self._warm_up()
        self.ready.set()
        while True:
            jobs = [self._jobs.get()]
            with self.lock:
                with contextlib.suppress(queue.Empty):
                    while True:
                        jobs.append(self._jobs.get_nowait())
                stop = None in jobs
                jobs = [j for j in jobs if j is not None and not j.future.cancelled()]
                try:
                    self._round(jobs)
                except Exception as e:  # the worker outlives any one round; its requests get a 500
                    log.exception("a round of %d inputs failed", len(jobs))
                    for j in jobs:
                        j.loop.call_soon_threadsafe(_settle, j.future, None, e)
            if stop:
                return

    def _round(self, jobs: list[_Job]) -> None:
        """Pack the jobs under the budget as `embed_items` does; one forward per bin, each bin's
        requests answered as soon as it is done (a failed bin fails only its own inputs)."""
        if not jobs:
            return
        costs = torch.tensor([sample_cost(j.sample) for j in jobs], dtype=torch.int64)
        order, offsets = host_ops.pack_bins(costs, self.batch_tokens, self.max_items)
        offsets = offsets.tolist()
        for b in range(len(offsets) - 1):
            members = [jobs[i] for i in order[offsets[b] : offsets[b + 1]].tolist()]
            members = [j for j in members if not j.future.cancelled()]
            if not members:
                continue
            t0 = time.perf_counter()
            try:
                out = self.forward([j.sample for j in members])
            except Exception as e:
                log.exception("forward of %d inputs failed", len(members))
                for j in members:
                    j.loop.call_soon_threadsafe(_settle, j.future, None, e)
                continue
            self.metrics.forward_seconds.observe(time.perf_counter() - t0)
            self.metrics.batch_inputs.observe(len(members))
            self.metrics.batch_tokens.observe(sum(sample_cost(j.sample) for j in members))
            for j, vec in zip(members, out):
                j.loop.call_soon_threadsafe(_settle, j.future, vec)


# ------------------------------------------------------------------------------- the server
class EmbeddingServer:
    """Admission, decoding and answering; the device work is the DeviceWorker's."""

    def __init__(self, model, processor: Processor, model_name: str = "tiny", batch_tokens: int = 16384,
                 max_items: int = 0, max_queue: int = 256, max_request_tokens: int | None = None,
                 pooling: str = "mean", warmup: bool = True, decode_threads: int | None = None,
                 payload_limit: int = 64 << 20, max_client_batch_size: int = 2048, body_timeout: float = 60.0,
                 api_key: str | None = None):
        self.processor, self.model_name, self.max_queue = processor, model_name, max_queue
        self.expected_auth = None if api_key is None else f"Bearer {api_key}".encode()
        self.untruncated = copy.copy(processor)  # encodes whole; `truncate` decides per request
        self.untruncated.max_length = None
        self.batch_tokens, self.max_items, self.payload_limit = batch_tokens, max_items, payload_limit
        self.max_client_batch_size, self.body_timeout = max_client_batch_size, body_timeout
        self.max_request_tokens = max_request_tokens or 4 * batch_tokens
        self.hidden_size = model.config.hidden_size
        self.metrics = Metrics()
        self.worker = DeviceWorker(model, processor, self.metrics, batch_tokens, max_items, pooling, warmup)
        self.decoders = ThreadPoolExecutor(decode_threads or min(8, os.cpu_count() or 1), thread_name_prefix="moca-decode")
        self.in_flight = 0  # touched only on the event loop

    def authorize(self, request: Request) -> None:
        """RequestError (unauthorized) unless the server has no API key or the request's Authorization header is
        `Bearer <key>` (scheme in any case, as RFC 7235 allows; compared in constant time)."""
        if self.expected_auth is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = f"Bearer {token.strip()}".encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, self.expected_auth):
            raise RequestError("unauthorized", "a missing or wrong API key: send the header "
                                               "'Authorization: Bearer <key>' with the key the server was started with",
                               headers={"WWW-Authenticate": "Bearer"})

    def encode(self, inputs: list[tuple[str, str, list]], truncate: bool = True) -> list[Sample]:
        """Parsed inputs -> Samples (runs in the decode pool), each error naming its field. The request's cost
        comes from the images' headers, so a request over --max-request-tokens is refused before any pixel is
        decoded; then one input's images at a time are decoded (a small file can hold a huge image).
        Inputs over the processor's max_length are truncated, or refused when not `truncate`."""
        items, total = [], 0
        for name, text, images in inputs:
            pictures = [image_bytes(v, f) for f, v in images]
            if pictures and normalize_markers(text).count(IMAGE_PAD) == 0:
                text = IMAGE_MARKER * len(pictures) + text
            item = {"text": text, "images": pictures}
            try:
                total += item_cost(self.processor, item)
            except ValueError as e:  # marker count, an image too elongated, images over max_length
                raise RequestError("invalid", f"{name}: {e}", name) from None
            items.append(item)
        if total > self.max_request_tokens:
            raise RequestError("too_large", f"the request brings {total} tokens + image patches, more than the limit "
                                            f"of {self.max_request_tokens} (--max-request-tokens)")
        limit, samples = self.processor.max_length, []
        for (name, _, images), item in zip(inputs, items):
            decoded = []
            for (field, _), raw in zip(images, item["images"]):
                try:
                    decoded.append(load_image(raw))
                except ImageError as e:  # the header read, the pixels do not
                    raise RequestError("invalid", f"{field}: {e}", field) from None
            sample = self.untruncated.encode({**item, "images": decoded})
            if limit is not None and len(sample) > limit:
                if not truncate:
                    raise RequestError("invalid", f"{name}: {len(sample)} tokens, more than the {limit} this server "
                                                  "takes (--max-length); truncate=true cuts it", name)
                sample = self.processor.truncate(sample, limit)
            samples.append(sample)
        return samples

    async def body(self, request: Request) -> bytes:
        """The request body, refused (too_large) past `payload_limit` bytes before it is all read, or (timeout)
        when it takes more than `body_timeout` seconds; ClientGone when the client disconnects meanwhile."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.payload_limit:
            raise RequestError("too_large", f"the body has {declared} bytes, more than the limit of "
                                            f"{self.payload_limit} (--payload-limit)")
        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.payload_limit:
                    raise RequestError("too_large", f"the body has more than {self.payload_limit} bytes (--payload-limit)")
                chunks.append(chunk)
            return b"".join(chunks)

        self.metrics.uploading.inc()
        try:
            return await asyncio.wait_for(read(), self.body_timeout)
        except ClientDisconnect:  # gone while uploading: as gone while queued
            raise ClientGone from None
        except asyncio.TimeoutError:
            raise RequestError("timeout", f"the body took more than {self.body_timeout:g} s to arrive "
                                          "(--body-timeout)") from None
        finally:
            self.metrics.uploading.dec()

    async def embed(self, request: Request, field: str, check) -> tuple[dict, torch.Tensor, int]:
        """Admit, parse (`check(payload)` vets the endpoint's options -> whether to truncate), decode, queue and
        wait -> (payload, (N, hidden) float32 pooled vectors, not normalised, LLM tokens)."""
        self.authorize(request)  # before a byte of the body is read
        if not self.worker.alive:
            raise RequestError("unavailable", "the device worker has stopped (see the server log)")
        full = RequestError("overloaded", f"the queue is full ({self.max_queue} requests waiting); retry shortly",
                            headers={"Retry-After": "1"})
        if self.in_flight >= self.max_queue:
            raise full
        body = await self.body(request)  # a slow upload holds no slot (and times out)
        if self.in_flight >= self.max_queue:
            raise full
        self.in_flight += 1
        self.metrics.queue_depth.set(self.in_flight)
        try:
            payload = parse_json(body)
            truncate = check(payload)
            inputs = parse_inputs(payload.get(field), field)
            if len(inputs) > self.max_client_batch_size:
                raise RequestError("too_large", f"{field}: {len(inputs)} inputs, more than the "
                                                f"{self.max_client_batch_size} a request may hold (--max-client-batch-size)",
                                   field)
            loop = asyncio.get_running_loop()
            samples = await loop.run_in_executor(self.decoders, self.encode, inputs, truncate)
            vectors = await _wait_unless_gone(request, self.worker.submit(samples, loop))
        finally:
            self.in_flight -= 1
            self.metrics.queue_depth.set(self.in_flight)
        tokens = sum(len(s) for s in samples)
        self.metrics.inputs.inc(len(samples))
        self.metrics.tokens.inc(tokens)
        return payload, torch.stack(vectors), tokens


async def _wait_unless_gone(request: Request, futures: list[asyncio.Future]) -> list[torch.Tensor]:
    """Wait for the vectors; if the client disconnects first, cancel its inputs and raise ClientGone."""

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    results = asyncio.gather(*futures)
    gone = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if results not in done:
        results.cancel()
        results.add_done_callback(lambda f: f.cancelled() or f.exception())  # read: no "never retrieved" log
        raise ClientGone
    return results.result()


def create_app(model, processor: Processor, **options) -> FastAPI:
    """The ASGI app; `options` go to EmbeddingServer. The device thread starts and stops with the app."""
    server = EmbeddingServer(model, processor, **options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.worker.start()
        try:
            yield
        finally:
            server.worker.stop()
            server.decoders.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="moca embeddings", lifespan=lifespan)
    app.state.server = server

    async def handle(request: Request, endpoint: str, field: str, check, answer, errors) -> Response:
        """One embedding request; a refusal answered in the API's error shape (`errors`: OPENAI_ERRORS or
        TEI_ERRORS), a failed forward as its backend error, the server serving on."""
        t0 = time.perf_counter()
        try:
            payload, vectors, tokens = await server.embed(request, field, check)
            # rendering thousands of vectors as JSON takes seconds: not on the loop, which serves /health too
            response = await asyncio.get_running_loop().run_in_executor(server.decoders, answer, payload, vectors,
                                                                         tokens)
        except RequestError as e:
            response = error_response(errors, e.kind, str(e), e.param, e.headers)
        except ClientGone:
            response = Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except Exception as e:  # a failed forward: answer the backend error, keep serving
            log.exception("request failed")
            response = error_response(errors, "backend", f"internal error: {e}")
        server.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        server.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    def error_response(errors: dict, kind: str, message: str, param: str | None = None, headers=None) -> Response:
        status, kind_name = errors[kind]
        if errors is OPENAI_ERRORS:  # {"error": {message, type, param, code}}, as OpenAI's API
            code = "invalid_api_key" if kind == "unauthorized" else None
            body = {"error": {"message": message, "type": kind_name, "param": param, "code": code}}
        else:  # {"error", "error_type"}, as text-embeddings-inference
            body = {"error": message, "error_type": kind_name}
        return JSONResponse(body, status, headers=headers)

    def openai_check(payload: dict) -> bool:
        if (payload.get("encoding_format") or "float") not in ("float", "base64"):  # null: OpenAI's default
            raise RequestError("invalid", f"encoding_format: 'float' or 'base64', got {payload['encoding_format']!r}",
                               "encoding_format")
        dims = payload.get("dimensions")
        if dims is not None and dims != server.hidden_size:
            raise RequestError("invalid", f"dimensions: this model returns {server.hidden_size}, got {dims!r}",
                               "dimensions")
        return True

    def openai_answer(payload: dict, vectors: torch.Tensor, tokens: int) -> Response:
        vectors = F.normalize(vectors, dim=-1)
        if payload.get("encoding_format") == "base64":  # little-endian float32, as OpenAI's
            data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vectors]
        else:
            data = vectors.tolist()
        return JSONResponse({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "model": server.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })

    def tei_check(payload: dict) -> bool:
        """TEI's /embed options: normalize (default true), truncate (default true: the server truncates at
        --max-length, as TEI's --auto-truncate), truncation_direction right only, dimensions and prompt_name
        only as no-ops; -> truncate."""
        for key in ("normalize", "truncate"):
            if not isinstance(payload.get(key, True), bool):
                raise RequestError("invalid", f"{key}: expected true or false, got {payload[key]!r}", key)
        direction = payload.get("truncation_direction") or "right"
        if not isinstance(direction, str) or direction.lower() != "right":
            raise RequestError("invalid", f"truncation_direction: this server cuts text from the end (right) only, "
                                          f"got {direction!r}", "truncation_direction")
        dims = payload.get("dimensions")
        if dims is not None and dims != server.hidden_size:
            raise RequestError("invalid", f"dimensions: this model returns {server.hidden_size}, got {dims!r}",
                               "dimensions")
        if payload.get("prompt_name") is not None:
            raise RequestError("invalid", "prompt_name: this server has no named prompts (put the instruction in "
                                          "the text)", "prompt_name")
        return payload.get("truncate", True)

    def tei_answer(payload: dict, vectors: torch.Tensor, tokens: int) -> Response:
        return JSONResponse((F.normalize(vectors, dim=-1) if payload.get("normalize", True) else vectors).tolist())

    @app.post("/v1/embeddings")
    @app.post("/embeddings")  # TEI serves the OpenAI route here too
    async def openai_embeddings(request: Request) -> Response:
        return await handle(request, request.url.path, "input", openai_check, openai_answer, OPENAI_ERRORS)

    @app.post("/embed")
    @app.post("/")  # TEI's route for the model's own task (huggingface_hub posts to the base URL)
    async def tei_embed(request: Request) -> Response:
        return await handle(request, request.url.path, "inputs", tei_check, tei_answer, TEI_ERRORS)

    @app.get("/info")
    async def info(request: Request) -> Response:
        """TEI's /info: what clients read to size their requests."""
        try:
            server.authorize(request)
        except RequestError as e:
            return error_response(TEI_ERRORS, e.kind, str(e), headers=e.headers)
        return JSONResponse({
            "model_id": server.model_name, "model_sha": None, "model_dtype": str(server.worker.dtype).split(".")[-1],
            "model_type": {"embedding": {"pooling": server.worker.pooling}},
            "max_concurrent_requests": server.max_queue, "max_input_length": server.processor.max_length,
            "max_batch_tokens": server.batch_tokens, "max_batch_requests": server.max_items or None,
            "max_client_batch_size": server.max_client_batch_size, "auto_truncate": server.processor.max_length is not None,
            "tokenization_workers": server.decoders._max_workers, "served_model_name": server.model_name,
            "version": "moca-engine", "sha": None, "docker_label": None,
        })

    @app.get("/health")
    @app.get("/ping")
    async def health() -> Response:
        if server.worker.ready.is_set() and server.worker.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "warming up" if server.worker.alive else "device worker stopped"}, 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        try:
            server.authorize(request)  # Prometheus scrapes with `authorization: {credentials: <key>}`
        except RequestError as e:
            return Response(str(e), 401, headers=e.headers)
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# ------------------------------------------------------------------------------- running it
@dataclass
class RunningServer:
    """A uvicorn server on its own thread (tests, benchmarks): `url`, `app`, `stop()`."""

    server: uvicorn.Server
    thread: threading.Thread
    app: FastAPI
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()


class BindError(RuntimeError):
    """host:port cannot be listened on (in use, not an address of this machine, a privileged port)."""


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0 = a free port). BindError naming the address when that fails."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise BindError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def start_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0) -> RunningServer:
    """Bind host:port (0 = a free port), serve `app` from a thread, return once it accepts connections."""
    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="moca-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{sock.getsockname()[1]}")
        time.sleep(0.01)
    return RunningServer(server, thread, app, f"http://{host}:{sock.getsockname()[1]}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m moca.serve", description="Serve embeddings over HTTP (OpenAI and TEI APIs).")
    p.add_argument("--model", default="tiny", help="a preset (tiny, 3b, 7b) or an HF checkpoint directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=bounded(int, 0, 65535), default=8080)
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch-tokens", type=POSITIVE, default=16384, help="token budget (LLM tokens + image patches) per forward")
    p.add_argument("--max-items", type=COUNT, default=0, help="most inputs per forward (0 = unlimited)")
    p.add_argument("--max-queue", type=POSITIVE, default=256, help="most requests admitted at once; more get 503")
    p.add_argument("--max-request-tokens", type=POSITIVE, default=None,
                   help="most tokens + patches per request, 413 over it (default 4 x --batch-tokens)")
    p.add_argument("--max-length", type=POSITIVE, default=None,
                   help="tokens per input (default: no limit); a longer one has its text cut from the end, its "
                   "images kept whole, and one whose images alone exceed it is an error; TEI's truncate=false "
                   "refuses them instead")
    add_image_tokens_arg(p)
    p.add_argument("--payload-limit", type=POSITIVE, default=64 << 20, help="most bytes in a request body, 413 over it")
    p.add_argument("--max-client-batch-size", type=POSITIVE, default=2048, help="most inputs in a request, 413 over it "
                                                                             "(OpenAI's cap)")
    p.add_argument("--body-timeout", type=bounded(float, 0.0, low_open=True), default=60.0, help="seconds a request body may take to arrive, 408 over")
    p.add_argument("--pooling", choices=["mean", "last"], default="mean")
    p.add_argument("--api-key", default=os.environ.get("MOCA_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every route but /health and /ping (401 otherwise; "
                        "default: $MOCA_API_KEY, which keeps the key out of the process list; unset: no check)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip embedding examples before /health is ready")
    args = p.parse_args(argv)
    if args.api_key is not None and (not args.api_key or any(c.isspace() for c in args.api_key)):
        p.error("--api-key: a key is one word, without spaces")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from moca.checkpoint import check_model_name, load_model

    check_model_name(args.model)
    sock = bind(args.host, args.port)  # before the model loads: a port in use fails at once, not minutes later
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model = load_model(args.model, device=args.device, dtype=dtype)
    processor = Processor.from_pretrained(args.model, max_length=args.max_length, image_tokens=args.image_tokens)
    app = create_app(model, processor, model_name=args.model, batch_tokens=args.batch_tokens, max_items=args.max_items,
                     max_queue=args.max_queue, max_request_tokens=args.max_request_tokens, pooling=args.pooling,
                     warmup=args.warmup, payload_limit=args.payload_limit,
                     max_client_batch_size=args.max_client_batch_size, body_timeout=args.body_timeout,
                     api_key=args.api_key)
    log.info("listening on http://%s:%d%s", args.host, sock.getsockname()[1],
             " (API key required)" if args.api_key else "")
    uvicorn.Server(uvicorn.Config(app, log_level="info", lifespan="on")).run(sockets=[sock])


if __name__ == "__main__":
    run_cli(main, "moca.serve", errors=(BindError,))  # a bad --model or address: one line, not a traceback
