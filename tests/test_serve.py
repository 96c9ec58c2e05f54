"""The search service (moco_mm.search.serve) against a real uvicorn server on a loopback port:
the JSON API and thumbnails, clip-retrieval's back-end API as its front end calls it, every
kind of bad input (answered 4xx, the next request still served), overload (503, then
served again), the page driven in headless Chromium as a person uses it, `python -m
moco_mm.serve`, and `moco-mm bench-serve`.

One module-scoped server over a random-init tiny export and a 48-image index (built in
about 4 s): the tests check the service, not retrieval quality (tests/test_search.py does).

The browser test needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them
with apt-get when missing). Without them it FAILS, naming the packages; set
MOCO_MM_SKIP_BROWSER=1 to skip it on purpose on a machine without them (CI never sets it).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from moco_mm.search.serve import Limits, create_app  # noqa: E402
from moco_mm.search.thumbs import ThumbStore  # noqa: E402

LIMITS = Limits(max_k=50, max_knn_results=200, max_query_chars=300, max_body_bytes=2 * 2 ** 20,
                max_image_pixels=1_000_000, max_concurrent=2, max_queue=2)


@dataclass
class Built:
    export: Path
    index: Path
    n_images: int


def build_tiny_index(base: Path) -> Built:
    """A random-init export of the tiny towers (no training) and a flat image + caption
    index of 48 demo images (64 px) with thumbnails."""
    import torch

    from moco_mm.config import load_config
    from moco_mm.data import demo
    from moco_mm.model import DualQueueMoCo, load_tokenizer
    from moco_mm.search import Encoder, build_index
    from moco_mm.search.export import export_encoders
    from moco_mm.train.checkpoint import CheckpointManager
    from tests.trainrun import tiny_train_config, write_config

    demo.build_demo(base / "demo", demo.DemoParams(n_train=64, n_val=48, image_size=64, train_shards=1,
                                                   val_shards=1))
    run = base / "run"
    run.mkdir()
    cfg = load_config(write_config(tiny_train_config(base / "demo", run), run / "config.yaml"))
    torch.manual_seed(0)
    model = DualQueueMoCo(cfg.model, cfg.queue, vocab_size=len(load_tokenizer(cfg.model.text)))
    CheckpointManager(run / "checkpoints").save(0, model.state_dict(), {"step": 0})
    export_encoders(base / "export", run_dir=run)
    build_index(Encoder.from_export(base / "export"), base / "demo" / "val" / "manifest.json", base / "index",
                captions=True)
    return Built(base / "export", base / "index", 48)


class ServerThread:
    """uvicorn.Server in a thread, on a loopback socket bound here (port 0: any free one)."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=5, limit_concurrency=64)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    return build_tiny_index(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def app(built):
    return create_app(built.index, limits=LIMITS, name="demo")


@pytest.fixture(scope="module")
def server(app):
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def meta(built) -> list[dict]:
    return [json.loads(line) for line in (built.index / "images.jsonl").read_text().splitlines()]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def thumb_png(built: Built, row: int) -> bytes:
    return png_bytes(Image.open(io.BytesIO(ThumbStore.load(built.index).get(row))))


def assert_serving(client) -> None:
    """The server still answers a normal query."""
    r = client.post("/search", json={"text": "a red circle", "k": 3})
    assert r.status_code == 200 and len(r.json()["results"]) == 3, r.text


# ---------------------------------------------------------------------------------------
# What works
# ---------------------------------------------------------------------------------------


def test_healthz_and_page(client, app, built):
    h = client.get("/healthz").json()
    svc = app.state.service
    assert h["status"] == "ok" and h["name"] == "demo"
    assert h["size"] == {"images": 48, "captions": 96} and h["kinds"] == ["images", "captions"]
    assert h["model_fingerprint"] == svc.encoder.fingerprint == json.loads(
        (built.index / "index.json").read_text())["model_fingerprint"]
    assert h["thumbnails"] == 48 and h["limits"]["max_k"] == 50
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="q"' in page.text and 'id="image"' in page.text and 'id="results"' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_text_search_returns_ranked_hits_with_thumbnails(client, built, meta):
    r = client.post("/search", json={"text": "a large red circle above a small blue square", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    hits = body["results"]
    assert body["target"] == "images" and body["k"] == 5 and len(hits) == 5
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    store = ThumbStore.load(built.index)
    for h in hits:  # ids and captions from the index metadata; the thumbnail of that row
        assert h["id"] == meta[h["row"]]["id"] and h["captions"] == meta[h["row"]]["captions"]
        assert h["caption"] == h["captions"][0] and h["thumb_url"] == f"/thumb/{h['row']}"
        t = client.get(h["thumb_url"])
        assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
        assert t.content == store.get(h["row"])
        assert "source" not in h  # no server paths handed out
    # Text -> captions: every caption hit names its image's row.
    caps = client.post("/search", json={"text": "a red circle", "k": 4, "target": "captions"}).json()["results"]
    assert len(caps) == 4 and all(c["caption"] in meta[c["row"]]["captions"] for c in caps)


def test_image_upload_finds_itself_and_its_captions(client, built, meta):
    """Multipart upload of image row 7 (its thumbnail, re-encoded as PNG): the image index
    ranks row 7 first; target=captions returns captions with their image rows."""
    png = thumb_png(built, 7)
    r = client.post("/search", files={"image": ("q.png", png, "image/png")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == {"image_bytes": len(png)} and body["results"][0]["row"] == 7
    assert body["results"][0]["score"] > 0.98
    r = client.post("/search", files={"image": ("q.png", png, "image/png")}, data={"k": "4", "target": "captions"})
    caps = r.json()["results"]
    assert r.status_code == 200 and len(caps) == 4
    assert all(c["caption"] in meta[c["row"]]["captions"] for c in caps)
    # The same image as base64 in JSON.
    r = client.post("/search", json={"image": base64.b64encode(png).decode(), "k": 1})
    assert r.status_code == 200 and r.json()["results"][0]["row"] == 7


# ---------------------------------------------------------------------------------------
# clip-retrieval's back-end API
# ---------------------------------------------------------------------------------------


def test_knn_service_answers_the_clip_retrieval_front_end(client, server, built, meta, app):
    """The body clip-retrieval's front end posts (front/src/clip-service.js: JSON sent as
    text/plain, its defaults: 40 images, 3000 result ids, safe mode on)."""
    front = {"text": "a small green star", "image": None, "image_url": None, "embedding_input": None,
             "modality": "image", "num_images": 40, "indice_name": "demo", "num_result_ids": 200,
             "use_mclip": False, "deduplicate": True, "use_safety_model": True, "use_violence_detector": True,
             "aesthetic_score": "9", "aesthetic_weight": "0.5"}
    r = client.post("/knn-service", content=json.dumps(front), headers={"Content-Type": "text/plain;charset=UTF-8",
                                                                         "Origin": "http://front.example"})
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "*"
    res = r.json()
    assert len(res) == 48 and len({x["id"] for x in res}) == 48  # all 48 images, once each
    sims = [x["similarity"] for x in res]
    assert sims == sorted(sims, reverse=True)
    for x in res[:40]:  # as clip-retrieval: url/caption for the first num_images
        assert x["url"] == f"{server.url}/thumb/{x['id']}" and x["caption"] == meta[x["id"]]["captions"][0]
        assert x["sample_id"] == meta[x["id"]]["id"]
    assert all(set(x) == {"id", "similarity"} for x in res[40:])
    assert client.get(res[0]["url"]).content == ThumbStore.load(built.index).get(res[0]["id"])
    # ... and fetches the rest with /metadata as the user scrolls
    rest = [x["id"] for x in res[40:]]
    md = client.post("/metadata", content=json.dumps({"ids": rest, "indice_name": "demo"})).json()
    assert [m["id"] for m in md] == rest
    assert all(m["metadata"]["caption"] == meta[m["id"]]["captions"][0] for m in md)
    assert client.get("/indices-list").json() == ["demo"]
    # modality text searches the captions: ids are the caption's image row
    txt = client.post("/knn-service", json={"text": "a blue cross", "modality": "text", "num_images": 5}).json()
    assert len(txt) == 5 and all(x["caption"] in meta[x["id"]]["captions"] for x in txt)
    # "search with this result": its own thumbnail URL comes back as image_url; nothing is fetched
    again = client.post("/knn-service", json={"image_url": res[3]["url"], "num_images": 1}).json()
    assert again[0]["id"] == res[3]["id"]
    # embedding_input: a query vector of the model's dimension
    vec = app.state.service.encoder.encode_texts(["a small green star"])[0]
    emb = client.post("/knn-service", json={"embedding_input": vec.tolist(), "num_images": 5}).json()
    assert [x["id"] for x in emb] == [x["id"] for x in res[:5]]
    assert np.allclose([x["similarity"] for x in emb], sims[:5], atol=1e-5)


# ---------------------------------------------------------------------------------------
# Bad input: a 4xx with a clear JSON message, and the next request still served
# ---------------------------------------------------------------------------------------


def _multipart_image(data: bytes, **fields) -> dict:
    return {"files": {"image": ("x.jpg", data, "image/jpeg")}, "data": fields}


BAD = {
    "malformed JSON": (lambda c: c.post("/search", content=b'{"text": "a red', headers={
        "Content-Type": "application/json"}), 400, "malformed JSON"),
    "JSON not an object": (lambda c: c.post("/search", json=["a red circle"]), 400, "JSON object"),
    "empty body": (lambda c: c.post("/search", content=b""), 400, "empty request body"),
    "no query": (lambda c: c.post("/search", json={"k": 3}), 422, "no query"),
    "empty text": (lambda c: c.post("/search", json={"text": ""}), 422, "empty"),
    "blank text": (lambda c: c.post("/search", json={"text": "  \n "}), 422, "empty"),
    "text not a string": (lambda c: c.post("/search", json={"text": 12}), 422, "must be a string"),
    "50,000-character text": (lambda c: c.post("/search", json={"text": "red " * 12500}), 422,
                              "text is 50000 characters; at most 300"),
    "k = 0": (lambda c: c.post("/search", json={"text": "a", "k": 0}), 422, "allowed 1 to 50"),
    "k = 10**6": (lambda c: c.post("/search", json={"text": "a", "k": 10 ** 6}), 422, "allowed 1 to 50"),
    "k = -3 in a form": (lambda c: c.post("/search", **_multipart_image(b"x", k="-3")), 422, "allowed 1 to 50"),
    "k not an integer": (lambda c: c.post("/search", json={"text": "a", "k": "ten"}), 422, "integer in [1, 50]"),
    "k a boolean": (lambda c: c.post("/search", json={"text": "a", "k": True}), 422, "integer in [1, 50]"),
    "unknown target": (lambda c: c.post("/search", json={"text": "a", "target": "videos"}), 422, "target"),
    "unknown field": (lambda c: c.post("/search", json={"text": "a", "path": "/etc/passwd"}), 422, "unknown"),
    "text and image": (lambda c: c.post("/search", json={"text": "a", "image": "aGk="}), 422, "not both"),
    "non-image upload": (lambda c: c.post("/search", **_multipart_image(b"hello, not an image")), 422,
                         "not an image"),
    "empty upload": (lambda c: c.post("/search", **_multipart_image(b"")), 422, "empty"),
    "truncated PNG": (lambda c: c.post("/search", **_multipart_image(
        png_bytes(Image.new("RGB", (40, 30), "red"))[:60])), 422, "image"),
    "image over the pixel limit": (lambda c: c.post("/search", **_multipart_image(
        png_bytes(Image.new("L", (1200, 1000))))), 422, "1200x1000 pixels; at most 1000000"),
    "bad base64": (lambda c: c.post("/search", json={"image": "not base64!!"}), 422, "base64"),
    "image field not a file": (lambda c: c.post("/search", data={"image": "abc", "k": "2"}, files={
        "other": ("o", b"o")}), 422, "uploaded file"),
    "two files": (lambda c: c.post("/search", files=[("image", ("a", b"a")), ("image", ("b", b"b"))]), 400,
                  "files"),
    "GET /search": (lambda c: c.get("/search"), 405, "Method Not Allowed"),
    "thumbnail out of range": (lambda c: c.get("/thumb/48"), 404, "no thumbnail for row 48"),
    "negative thumbnail": (lambda c: c.get("/thumb/-1"), 404, "no thumbnail"),
    "thumbnail not a number": (lambda c: c.get("/thumb/..%2F..%2Fetc%2Fpasswd"), 404, ""),
    "knn image_url": (lambda c: c.post("/knn-service", json={"image_url": "http://169.254.169.254/latest",
                                                             "num_images": 3}), 422, "never fetches URLs"),
    "knn foreign thumb URL": (lambda c: c.post("/knn-service", json={"image_url": "http://evil.example/thumb/1"}),
                              422, "never fetches URLs"),
    "knn modality": (lambda c: c.post("/knn-service", json={"text": "a", "modality": "video"}), 422, "modality"),
    "knn num_images 0": (lambda c: c.post("/knn-service", json={"text": "a", "num_images": 0}), 422,
                         "allowed 1 to 200"),
    "knn num_result_ids 10**6": (lambda c: c.post("/knn-service", json={"text": "a", "num_result_ids": 10 ** 6}),
                                 422, "allowed 1 to 200"),
    "knn other index": (lambda c: c.post("/knn-service", json={"text": "a", "indice_name": "laion5B"}), 422,
                        "this server has ['demo']"),
    "knn no query": (lambda c: c.post("/knn-service", json={"modality": "image"}), 422, "no query"),
    "knn embedding of the wrong size": (lambda c: c.post("/knn-service", json={"embedding_input": [1.0, 2.0]}),
                                        422, "list of 32 numbers"),
    "knn zero embedding": (lambda c: c.post("/knn-service", json={"embedding_input": [0.0] * 32}), 422,
                           "not all zeros"),
    "metadata ids not a list": (lambda c: c.post("/metadata", json={"ids": "1,2"}), 422, "ids"),
    "50 MB upload": (lambda c: c.post("/search", **_multipart_image(b"\xff" * (50 * 2 ** 20))), 413,
                     "request body over 2097152 bytes"),
    "50 MB chunked body (no Content-Length)": (lambda c: c.post("/search", content=(
        b"x" * 2 ** 20 for _ in range(50)), headers={"Content-Type": "application/json"}), 413,
        "request body over 2097152 bytes"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_and_the_next_request_is_served(client, case):
    send, status, words = BAD[case]
    r = send(client)
    assert r.status_code == status, f"{case}: {r.status_code} {r.text[:300]}"
    if r.status_code != 404 or words:
        detail = r.json()["detail"]
        assert isinstance(detail, str) and words in detail, f"{case}: {detail!r}"
    assert_serving(client)


def test_oversized_body_is_refused_before_it_is_read(server, client):
    """Content-Length over the limit: 413 while the client has sent 64 KiB of a declared
    50 MB, i.e. without reading (or waiting for) the rest."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 52428800\r\n\r\n" + b"{" * 65536)
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
                data.lower().split(b"content-length:")[1].split(b"\r\n")[0]):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), data[:200]
    assert "Content-Length 52428800" in json.loads(body)["detail"]
    assert_serving(client)


def test_overload_gets_503_and_the_server_recovers(client, app, monkeypatch):
    """2 queries run and 2 wait (LIMITS); with embedding held up, 10 more concurrent queries
    get 503 + Retry-After at once, the 4 admitted ones are answered when it resumes."""
    svc = app.state.service
    release = threading.Event()
    real = svc.embed_text

    def slow(text):
        assert release.wait(20)
        return real(text)

    monkeypatch.setattr(svc, "embed_text", slow)
    results: list = []

    def one(i):
        with httpx.Client(base_url=str(client.base_url), timeout=30) as c:
            results.append(c.post("/search", json={"text": f"query {i}", "k": 2}))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(14)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while sum(r.status_code == 503 for r in results) < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    busy = [r for r in results if r.status_code == 503]
    assert len(busy) == 10, [r.status_code for r in results]
    assert all("busy" in r.json()["detail"] and r.headers["retry-after"] == "1" for r in busy)
    assert client.get("/healthz").status_code == 200  # the event loop is not blocked meanwhile
    release.set()
    for t in threads:
        t.join(30)
    assert sorted(r.status_code for r in results) == [200] * 4 + [503] * 10
    monkeypatch.undo()
    assert_serving(client)


# ---------------------------------------------------------------------------------------
# As a person uses it: the page in headless Chromium
# ---------------------------------------------------------------------------------------


def _browser_binaries() -> tuple[str, str]:
    chrome = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chrome, driver) if not os.access(p, os.X_OK)]
    if missing:
        msg = (f"the browser test needs Debian's chromium and chromium-driver ({', '.join(missing)} missing): "
               f"apt-get install chromium chromium-driver (.ci/run does)")
        if os.environ.get("MOCO_MM_SKIP_BROWSER") == "1":
            pytest.skip(f"MOCO_MM_SKIP_BROWSER=1: SKIPPING THE BROWSER TEST: {msg}")
        pytest.fail(msg + "; or set MOCO_MM_SKIP_BROWSER=1 to skip it on purpose")
    return chrome, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chrome, driver = _browser_binaries()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    # The system chromedriver, so that Selenium Manager never looks for (or downloads) one.
    drv = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


LOADED_THUMBS = """return Array.from(document.querySelectorAll('#results img.thumb'))
    .filter(i => i.complete && i.naturalWidth > 0).length"""


def test_the_page_searches_by_text_and_by_image_in_chromium(browser, server, client, built, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: "48 images" in d.find_element(By.ID, "status").text)  # /healthz answered
    query = "a large red circle above a small blue square"
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("6")
    browser.find_element(By.ID, "q").send_keys(query)
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: d.execute_script(LOADED_THUMBS) == 6)  # six thumbnails actually loaded
    figures = browser.find_elements(By.CSS_SELECTOR, "#results figure.result")
    shown = [(f.find_element(By.CLASS_NAME, "caption").text, f.find_element(By.CLASS_NAME, "score").text)
             for f in figures]
    assert "6 results" in browser.find_element(By.ID, "status").text
    # What the page shows is what the API answers, in order, with the scores printed.
    api = client.post("/search", json={"text": query, "k": 6}).json()["results"]
    assert [c for c, _ in shown] == [h["caption"] for h in api]
    assert all(f"{h['score']:.4f}" in s and str(h["id"]) in s for (_, s), h in zip(shown, api))
    srcs = [i.get_attribute("src") for i in browser.find_elements(By.CSS_SELECTOR, "#results img.thumb")]
    assert srcs == [f"{server.url}/thumb/{h['row']}" for h in api]

    # Upload an image file: its own row comes first.
    path = tmp_path / "query.png"
    path.write_bytes(thumb_png(built, 11))
    browser.find_element(By.ID, "q").clear()
    browser.find_element(By.ID, "image").send_keys(str(path))
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: d.execute_script(LOADED_THUMBS) == 6 and
               d.find_element(By.CSS_SELECTOR, "#results img.thumb").get_attribute("src").endswith("/thumb/11"))

    # A refused query shows the server's message; the next one is served again.
    browser.execute_script("document.getElementById('image').value = '';"
                           "document.getElementById('q').value = 'red '.repeat(100);")
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: "at most 300 are accepted" in d.find_element(By.ID, "status").text)
    assert browser.find_elements(By.CSS_SELECTOR, "#results figure") == []
    browser.find_element(By.ID, "q").clear()
    browser.find_element(By.ID, "q").send_keys("a green square")
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: d.execute_script(LOADED_THUMBS) == 6)


# ---------------------------------------------------------------------------------------
# The programs
# ---------------------------------------------------------------------------------------


def test_the_serve_program(built, tmp_path, monkeypatch, capsys):
    """`moco-mm serve` / `python -m moco_mm.serve` (moco_mm/serve.py only calls this main;
    tests/test_layout.py checks that): flags reach uvicorn and the limits, and the app it
    builds answers with them. A missing index exits 2 naming it. (A subprocess would cost
    10-30 s of imports on a shared CI machine; uvicorn.run is replaced, the app is served
    here as the other tests serve theirs.)"""
    from moco_mm.search.serve import main

    assert main(["--index", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    assert main(["--index", str(built.index), "--export", str(built.export), "--port", "8123", "--max-k", "7",
                 "--max-body-mb", "0.5", "--max-concurrent", "3", "--name", "shapes", "--cors-origins", ""]) == 0
    assert "serve: shapes: 48 images, 96 captions" in capsys.readouterr().err
    assert ran["host"] == "127.0.0.1" and ran["port"] == 8123 and ran["limit_concurrency"] == 256
    lim = ran["app"].state.service.limits
    assert (lim.max_k, lim.max_body_bytes, lim.max_concurrent) == (7, 2 ** 19, 3)
    with ServerThread(ran["app"]) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        assert len(c.post("/search", json={"text": "a red circle", "k": 7}).json()["results"]) == 7
        r = c.post("/search", json={"text": "a red circle", "k": 8})
        assert r.status_code == 422 and "allowed 1 to 7" in r.json()["detail"]
        assert c.get("/indices-list").json() == ["shapes"]
        r = c.post("/knn-service", json={"text": "a"}, headers={"Origin": "http://front.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # --cors-origins ''
    with pytest.raises(SystemExit):
        main(["--index", str(built.index), "--max-queue", "x"])


def test_bench_serve_reports_latency_and_throughput(server, tmp_path, capsys):
    from moco_mm.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench-serve", "--url", server.url, "--concurrency", "1,2", "--requests", "8", "--warmup", "2",
                 "-k", "5", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "p50 ms" in text and "q/s" in text
    levels = json.loads(out.read_text())["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert lv["ok"] == 8 and not lv["errors"] and 0 < lv["p50_ms"] <= lv["p99_ms"] and lv["qps"] > 0
