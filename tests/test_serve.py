"""`python -m moca.serve` over real HTTP: a uvicorn server on a loopback port, called with httpx.

The oracle is `model.embed` of each input alone. Batching and overload are made deterministic by
holding the device worker's lock (the worker stalls, requests pile up behind it), never by timing.
"""

import base64
import io
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from hf_oracle import random_image
from moca import Processor, load_model
from moca.serve import create_app, start_in_thread

MARKER = "<|vision_start|><|image_pad|><|vision_end|>"
MAX_QUEUE = 4
MAX_REQUEST_TOKENS = 3000


def png(width, height, seed) -> bytes:
    buf = io.BytesIO()
    random_image(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def tiny():
    model = load_model("tiny")
    model.attn_backend = "torch"
    return model, Processor.from_pretrained("tiny")


@pytest.fixture(scope="module")
def served(tiny):
    model, proc = tiny
    app = create_app(model, proc, batch_tokens=16384, max_queue=MAX_QUEUE, max_request_tokens=MAX_REQUEST_TOKENS)
    running = start_in_thread(app)
    with httpx.Client(base_url=running.url, timeout=60) as client:
        wait_until(lambda: client.get("/health").status_code == 200)
        yield running, client, app.state.server
    running.stop()


def wait_until(condition, timeout=30.0):
    """Poll a condition the server reaches by itself (a wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the server never reached the expected state")
        time.sleep(0.01)


def metric(server, name, **labels) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


def oracle(tiny, items) -> torch.Tensor:
    model, proc = tiny
    with torch.no_grad():
        return torch.cat([model.embed(proc([it])) for it in items])


def vectors(response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    return torch.tensor([d["embedding"] for d in response.json()["data"]])


def request_in_thread(client, path, body) -> tuple[threading.Thread, dict]:
    out = {}
    thread = threading.Thread(target=lambda: out.update(response=client.post(path, json=body)))
    thread.start()
    return thread, out


# (what is sent, what the processor is given for the oracle)
IMG_A, IMG_B, IMG_C = png(200, 120, 1), png(60, 60, 2), png(90, 300, 3)
CASES = [
    ("a short text", {"text": "a short text"}),
    ({"image": b64(IMG_A)}, {"images": [IMG_A]}),
    ({"text": "Represent the given image.\n", "image": "data:image/png;base64," + b64(IMG_B)},
     {"text": MARKER + "Represent the given image.\n", "images": [IMG_B]}),
    ({"text": "two " + MARKER + " images " + MARKER, "images": [b64(IMG_B), b64(IMG_C)]},
     {"text": "two " + MARKER + " images " + MARKER, "images": [IMG_B, IMG_C]}),
    ({"text": "a much longer text " * 30}, {"text": "a much longer text " * 30}),
    ("x", {"text": "x"}),
]


def test_concurrent_requests_batch_together_and_equal_embedding_alone(served, tiny):
    running, client, server = served
    sent, items = zip(*CASES)
    expected = oracle(tiny, items)
    # three clients, two inputs each; the worker is stalled until all six inputs wait in its queue
    bodies = [{"input": list(sent[k : k + 2])} for k in range(0, len(sent), 2)]
    queued, forwards = metric(server, "moca_queued_inputs_total"), metric(server, "moca_batch_inputs_count")
    with server.worker.lock:
        threads = [request_in_thread(client, "/v1/embeddings", body) for body in bodies]
        wait_until(lambda: metric(server, "moca_queued_inputs_total") == queued + len(sent))
    for t, _ in threads:
        t.join()
    got = torch.cat([vectors(out["response"]) for _, out in threads])
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
    # all six went through one forward: inputs from different clients were packed together
    assert metric(server, "moca_batch_inputs_count") == forwards + 1
    usage = [out["response"].json()["usage"]["prompt_tokens"] for _, out in threads]
    _, proc = tiny
    assert usage == [sum(len(proc.encode(it)) for it in items[k : k + 2]) for k in range(0, len(items), 2)]


def test_base64_encoding_tei_endpoint_and_metrics(served, tiny):
    running, client, server = served
    sent, items = zip(*CASES[:3])
    expected = oracle(tiny, items)
    r = client.post("/v1/embeddings", json={"input": list(sent), "encoding_format": "base64", "model": "m"})
    assert r.status_code == 200 and r.json()["model"] == "tiny"  # the served model, whatever the client named
    got = torch.from_numpy(np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]]))
    assert (got - expected).abs().max().item() <= 1e-5
    tokens = r.json()["usage"]["total_tokens"]

    r = client.post("/embed", json={"inputs": "a short text"})
    assert r.status_code == 200
    assert (torch.tensor(r.json()) - oracle(tiny, [{"text": "a short text"}])).abs().max().item() <= 1e-5
    # single string input on the OpenAI endpoint too, and a null encoding_format is OpenAI's default, float
    for options in ({}, {"encoding_format": None}):
        assert torch.allclose(vectors(client.post("/v1/embeddings", json={"input": "a short text", **options})),
                              torch.tensor(r.json()), atol=1e-5)

    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("moca_requests_total", (("endpoint", "/embed"), ("status", "200")))] >= 1
    assert samples[("moca_tokens_total", ())] >= tokens
    assert samples[("moca_queue_depth", ())] == 0
    for name in ("moca_batch_inputs", "moca_batch_tokens", "moca_request_latency_seconds", "moca_forward_seconds"):
        assert families[name].type == "histogram"


GOOD = b64(IMG_B)
BAD_INPUTS = [
    (b'{"input": ', 400, "not valid JSON"),
    (b'{"input": "\\ud800 a lone surrogate"}', 400, "input: not valid Unicode text"),  # JSON may escape one
    ({"input": [[9707, 11, 1879]]}, 400, "input: token ids are not accepted"),
    ({"input": [9707, 11]}, 400, "input: token ids are not accepted"),
    ({"input": True}, 400, "input: expected a string"),  # a JSON true is no token id
    ({"input": ["a", ""]}, 400, "input[1]: empty text"),
    ({"input": [{"text": "x", "image": "https://example.com/cat.png"}]}, 400, "input[0].image: image URLs"),
    (b'["a list"]', 400, "JSON object"),
    ({"inputs": "wrong field"}, 400, "input: required"),
    ({"input": []}, 400, "input: must not be empty"),
    ({"input": ["fine", 7]}, 400, "input[1]: expected a string"),
    ({"input": ["fine", {"text": "x", "image": "not base64!"}]}, 400, "input[1].image: not valid base64"),
    ({"input": [{"text": "x", "image": "data:image/png," + GOOD}]}, 400, "input[0].image: a data URL"),
    ({"input": ["a", "b", {"image": b64(b"this is not an image")}]}, 400, "input[2].image: cannot decode image"),
    ({"input": [{"images": [GOOD, b64(IMG_A[:100])]}]}, 400, "input[0].images[1]: cannot decode image"),
    ({"input": [{"text": MARKER + MARKER, "image": GOOD}]}, 400, "input[0]: the text names 2 image(s)"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": ["word " * 4000]}, 413, str(MAX_REQUEST_TOKENS)),
]


@pytest.mark.parametrize("body,status,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_gets_its_status_naming_the_field(served, tiny, body, status, message):
    running, client, server = served
    if isinstance(body, bytes):
        r = client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/embeddings", json=body)
    assert r.status_code == status
    assert message in r.json()["error"]["message"]
    # the worker survived: the next request is served correctly
    assert (vectors(client.post("/v1/embeddings", json={"input": "x"})) - oracle(tiny, [{"text": "x"}])).abs().max() <= 1e-5


def test_tei_errors_use_tei_shape_and_statuses(served):
    """text-embeddings-inference's router: Validation 422, Empty 400, {"error", "error_type"}."""
    _, client, _ = served
    r = client.post("/embed", json={"inputs": [{"image": "%%%"}]})
    assert r.status_code == 422 and r.json()["error_type"] == "Validation"
    assert "inputs[0].image: not valid base64" in r.json()["error"]
    r = client.post("/embed", json={"inputs": []})
    assert (r.status_code, r.json()["error_type"]) == (400, "Empty")
    for options, field in (({"truncation_direction": "left"}, "truncation_direction"), ({"dimensions": 7}, "dimensions"),
                           ({"prompt_name": "query"}, "prompt_name"), ({"normalize": "yes"}, "normalize")):
        r = client.post("/embed", json={"inputs": "x", **options})
        assert r.status_code == 422 and r.json()["error"].startswith(field), options


def test_openai_error_body_and_tei_routes(served, tiny):
    """OpenAI's error body names the parameter; TEI's aliases (POST / and /embeddings) and /info answer."""
    _, client, server = served
    r = client.post("/v1/embeddings", json={"input": "x", "dimensions": 3})
    assert r.json()["error"] == {"message": f"dimensions: this model returns {server.hidden_size}, got 3",
                                 "type": "invalid_request_error", "param": "dimensions", "code": None}
    expected = oracle(tiny, [{"text": "x"}])
    assert (torch.tensor(client.post("/", json={"inputs": "x"}).json()) - expected).abs().max() <= 1e-5
    assert (vectors(client.post("/embeddings", json={"input": "x"})) - expected).abs().max() <= 1e-5
    info = client.get("/info").json()
    assert info["model_id"] == "tiny" and info["max_batch_tokens"] == 16384 and info["auto_truncate"] is False


def test_tei_normalize_false_and_literal_markup(served, tiny):
    """normalize=false gives the pooled vector itself; a text without images is text, `<image>` tags and all."""
    _, client, _ = served
    model, proc = tiny
    text = "see the <image> tag and <|image_1|> in this HTML"
    with torch.no_grad():
        pooled = model.embed(proc([{"text": text}]), normalize=False)
    raw = torch.tensor(client.post("/embed", json={"inputs": text, "normalize": False}).json())
    assert (raw - pooled).abs().max() <= 1e-5 and abs(raw.norm() - 1) > 1e-3
    unit = torch.tensor(client.post("/embed", json={"inputs": text}).json())
    assert (unit - torch.nn.functional.normalize(pooled, dim=-1)).abs().max() <= 1e-5


def test_full_queue_gives_503_and_the_server_keeps_serving(served, tiny):
    running, client, server = served
    expected = oracle(tiny, [{"text": f"text {k}"} for k in range(MAX_QUEUE)])
    with server.worker.lock:
        threads = [request_in_thread(client, "/v1/embeddings", {"input": f"text {k}"}) for k in range(MAX_QUEUE)]
        wait_until(lambda: server.in_flight == MAX_QUEUE)
        r = client.post("/v1/embeddings", json={"input": "one too many"})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert metric(server, "moca_queue_depth") == MAX_QUEUE
    for t, _ in threads:
        t.join()
    got = torch.cat([vectors(out["response"]) for _, out in threads])
    assert (got - expected).abs().max().item() <= 1e-5
    assert client.post("/v1/embeddings", json={"input": "one too many"}).status_code == 200


def test_a_failed_forward_gives_500_and_the_worker_keeps_serving(served, tiny, monkeypatch):
    _, client, server = served

    def boom(samples):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(server.worker, "forward", boom)
    r = client.post("/v1/embeddings", json={"input": ["x", "y"]})
    assert r.status_code == 500 and "out of memory" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert (vectors(client.post("/v1/embeddings", json={"input": "x"})) - oracle(tiny, [{"text": "x"}])).abs().max() <= 1e-5


def test_client_disconnect_cancels_its_inputs_and_never_stalls_the_batch(served, tiny):
    running, client, server = served
    host, port = running.url.removeprefix("http://").split(":")
    body = b'{"input": ["going away", "soon"]}'
    queued = metric(server, "moca_queued_inputs_total")
    with server.worker.lock:
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: metric(server, "moca_queued_inputs_total") == queued + 2)
        sock.close()
        # the handler notices while the worker is still stalled, and frees its queue slot
        wait_until(lambda: server.in_flight == 0)
    assert metric(server, "moca_requests_total", endpoint="/v1/embeddings", status="499") == 1
    assert (vectors(client.post("/v1/embeddings", json={"input": "x"})) - oracle(tiny, [{"text": "x"}])).abs().max() <= 1e-5


def test_health_reports_ready_only_after_warm_up(tiny):
    model, proc = tiny
    app = create_app(model, proc)
    worker = app.state.server.worker
    worker.lock.acquire()  # the warm-up runs under the lock: it cannot finish while we hold it
    held = True
    running = start_in_thread(app)
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            assert client.get("/health").status_code == 503
            worker.lock.release()
            held = False
            wait_until(worker.ready.is_set)
            assert client.get("/health").json() == {"status": "ok"}
            assert metric(app.state.server, "moca_batch_inputs_count") == 0  # warm-up is not traffic
    finally:
        if held:
            worker.lock.release()
        running.stop()


def test_truncate_and_payload_limit(tiny):
    """With --max-length, TEI's truncate=false refuses a longer input where the default cuts it (as the
    processor does); a body over --payload-limit is refused before it is read whole."""
    model, _ = tiny
    proc = Processor.from_pretrained("tiny", max_length=8)
    app = create_app(model, proc, warmup=False, payload_limit=2000)
    running = start_in_thread(app)
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            wait_until(lambda: client.get("/health").status_code == 200)
            long_text = "many words here " * 10
            cut = torch.tensor(client.post("/embed", json={"inputs": long_text}).json())
            assert (cut - oracle((model, proc), [{"text": long_text}])).abs().max() <= 1e-5
            r = client.post("/embed", json={"inputs": long_text, "truncate": False})
            assert r.status_code == 422 and "more than the 8 this server takes" in r.json()["error"]
            r = client.post("/v1/embeddings", json={"input": "x" * 3000})
            assert r.status_code == 413 and "--payload-limit" in r.json()["error"]["message"]
    finally:
        running.stop()


def test_api_key_guards_every_route_but_health(tiny):
    """With an API key, a request without `Authorization: Bearer <key>` (or with another key) gets 401 in its
    API's error shape before its body is read, and embeds nothing; the right key (any case of "Bearer") is
    served as without a key; /health and /ping stay open for load balancers."""
    model, proc = tiny
    app = create_app(model, proc, warmup=False, api_key="s3cret-key")
    server = app.state.server
    running = start_in_thread(app)
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            wait_until(lambda: client.get("/health").status_code == 200)
            assert client.get("/ping").status_code == 200
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                            {"Authorization": "Basic s3cret-key"}, {"Authorization": "Bearer s3cret-key2"}):
                r = client.post("/v1/embeddings", json={"input": "a cat"}, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
                assert r.json()["error"]["code"] == "invalid_api_key"
                r = client.post("/embed", json={"inputs": "a cat"}, headers=headers)
                assert r.status_code == 401 and r.json()["error_type"] == "Unauthorized"
                assert client.get("/info", headers=headers).status_code == 401
                assert client.get("/metrics", headers=headers).status_code == 401
            assert metric(server, "moca_inputs_total") == 0  # nothing refused was embedded
            # a large body without the key is refused at its headers: the server never waits for the body
            with _raw(running.url, b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: 100000\r\n\r\n") as sock:
                sock.settimeout(30)
                assert sock.recv(4096).startswith(b"HTTP/1.1 401")
            for scheme in ("Bearer", "bearer", "BEARER"):
                ok = {"Authorization": f"{scheme} s3cret-key"}
                got = vectors(client.post("/v1/embeddings", json={"input": ["a cat"]}, headers=ok))
                assert (got - oracle(tiny, [{"text": "a cat"}])).abs().max() <= 1e-5
                assert client.get("/info", headers=ok).json()["model_id"] == "tiny"
                assert client.get("/metrics", headers=ok).status_code == 200
    finally:
        running.stop()


def _raw(url: str, head: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head)
    return sock


def test_slow_and_vanishing_uploads(tiny, caplog):
    """A client that stalls mid-upload holds no queue slot and gets 408 after --body-timeout; one that
    disconnects mid-upload is a 499, as one that leaves while queued, never a logged 500."""
    model, proc = tiny
    app = create_app(model, proc, warmup=False, max_queue=1, body_timeout=2.0)
    server = app.state.server
    running = start_in_thread(app)
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            wait_until(lambda: client.get("/health").status_code == 200)
            stalled = _raw(running.url, head)
            wait_until(lambda: metric(server, "moca_uploading") == 1)  # its handler waits for the body
            assert vectors(client.post("/v1/embeddings", json={"input": "x"})).shape[0] == 1  # max_queue 1: not held
            stalled.settimeout(30)
            assert stalled.recv(1000).startswith(b"HTTP/1.1 408")
            stalled.close()
            with caplog.at_level("ERROR"):
                gone = _raw(running.url, head)
                wait_until(lambda: metric(server, "moca_uploading") == 1)
                gone.close()
                wait_until(lambda: metric(server, "moca_requests_total", endpoint="/v1/embeddings", status="499") == 1)
            assert metric(server, "moca_requests_total", endpoint="/v1/embeddings", status="500") == 0
            assert "request failed" not in caplog.text and server.in_flight == 0
            assert metric(server, "moca_uploading") == 0
    finally:
        running.stop()


def test_a_request_holds_at_most_max_client_batch_size_inputs(tiny):
    model, proc = tiny
    app = create_app(model, proc, warmup=False, max_client_batch_size=3)
    running = start_in_thread(app)
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            wait_until(lambda: client.get("/health").status_code == 200)
            assert client.get("/info").json()["max_client_batch_size"] == 3
            r = client.post("/v1/embeddings", json={"input": ["a", "b", "c", "d"]})
            assert r.status_code == 413 and "4 inputs, more than the 3" in r.json()["error"]["message"]
            assert vectors(client.post("/v1/embeddings", json={"input": ["a", "b", "c"]})).shape[0] == 3
    finally:
        running.stop()


def test_a_request_over_its_token_limit_is_refused_before_any_pixel_is_decoded(served, monkeypatch):
    """A small PNG can hold a huge image: the cost comes from the header, the pixels are never decoded."""
    running, client, server = served
    buf = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (6000, 6000)).save(buf, format="PNG")  # 6000 x 6000, a few kB as a file
    monkeypatch.setattr("moca.serve.load_image", lambda raw: pytest.fail("decoded before the limit check"))
    r = client.post("/v1/embeddings", json={"input": [{"image": b64(buf.getvalue())}] * 40})
    assert r.status_code == 413 and "--max-request-tokens" in r.json()["error"]["message"]


def test_requests_waiting_when_warm_up_fails_get_503(tiny, monkeypatch):
    model, proc = tiny
    app = create_app(model, proc)
    worker = app.state.server.worker
    release = threading.Event()

    def failing_warm_up():
        release.wait(30)
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(worker, "_warm_up", failing_warm_up)
    running = start_in_thread(app)
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            thread, out = request_in_thread(client, "/v1/embeddings", {"input": "waits for the warm-up"})
            wait_until(lambda: metric(app.state.server, "moca_queued_inputs_total") == 1)
            release.set()
            thread.join(60)
            assert out["response"].status_code == 503 and "stopped" in out["response"].json()["error"]["message"]
            wait_until(lambda: client.get("/health").json() == {"status": "device worker stopped"})
    finally:
        running.stop()


def test_cli_bad_model_is_one_line(tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "moca.serve", "--model", str(tmp_path / "nope")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.splitlines() == [f"moca.serve: '{tmp_path / 'nope'}' is neither a checkpoint directory nor a "
                                       "preset (tiny, 3b, 7b)"]


def test_cli_port_in_use_fails_before_the_model_loads(tmp_path):
    """A port in use is one line at once, not after a model load that can take minutes."""
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "moca.serve", "--port", str(port), "--model", "tiny"],
                             capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr and "loaded" not in run.stderr
    assert run.stderr.splitlines()[-1].startswith(f"moca.serve: cannot listen on 127.0.0.1:{port}: ")


def test_cli_serves_on_the_socket_it_bound():
    """`python -m moca.serve --port 0`: the socket bound before the model loads is the one that serves, with
    the API key of $MOCA_API_KEY (kept out of the command line)."""
    import os
    import re
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "moca.serve", "--port", "0", "--model", "tiny", "--no-warmup"],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, MOCA_API_KEY="from-env"))
    try:
        url = None
        for line in proc.stderr:
            if m := re.search(r"listening on (http://127\.0\.0\.1:\d+) \(API key required\)", line):
                url = m.group(1)
                break
        assert url, "no 'listening on ... (API key required)' line"
        deadline = time.monotonic() + 120
        while True:
            try:
                refused = httpx.post(url + "/v1/embeddings", json={"input": ["a cat"]}, timeout=60)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert refused.status_code == 401
        reply = httpx.post(url + "/v1/embeddings", json={"input": ["a cat"]}, timeout=60,
                           headers={"Authorization": "Bearer from-env"})
        assert reply.status_code == 200 and len(reply.json()["data"][0]["embedding"]) > 0
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_base64_images_without_padding_decode_to_their_bytes():
    """Base64 with its '=' padding stripped (as many clients and data URLs send it) is the same image: every padding
    length (file sizes 0, 1 and 2 mod 3), bare and as a data URL, with line breaks inside."""
    from moca.serve import image_bytes

    pictures = [png(40 + k, 30 + 2 * k, k) for k in range(6)]
    assert {len(p) % 3 for p in pictures} == {0, 1, 2}
    for raw in pictures:
        text = b64(raw).rstrip("=")
        assert image_bytes(text, "f") == raw
        assert image_bytes("data:image/png;base64," + text, "f") == raw
        assert image_bytes(text[:50] + "\n" + text[50:], "f") == raw


def test_the_request_token_limit_is_counted_exactly(served, tiny):
    """--max-request-tokens is the request's tokens (text only: the tokenizer's count): a request of exactly the
    limit is served, one token more is refused with 413 naming the flag."""
    running, client, server = served
    tokens = lambda text: len(tiny[1].tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert tokens(" x" * 10) == 10
    at_limit = [" x" * (MAX_REQUEST_TOKENS // 2), " x" * (MAX_REQUEST_TOKENS // 2)]
    assert sum(map(tokens, at_limit)) == MAX_REQUEST_TOKENS
    assert vectors(client.post("/v1/embeddings", json={"input": at_limit})).shape[0] == 2
    r = client.post("/v1/embeddings", json={"input": at_limit + [" x"]})
    assert r.status_code == 413 and "--max-request-tokens" in r.json()["error"]["message"]
