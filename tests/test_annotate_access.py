"""`align annotate` safe to share: the Host check (DNS rebinding), the token off loopback, bounded bodies and
annotator ids, strict judgement types, unset safety marks, security headers on every answer, and a loopback
load test (20 client threads, 500 requests) that loses and duplicates no judgement. A fake sampler stands in
for the model, so the whole file runs in seconds."""
from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import Counter

import httpx
import pytest
from fastapi.testclient import TestClient

from alignment import annotate_access
from alignment.annotate import (AnnotateSettings, AnnotationError, AnnotationStore, clean_annotator, create_app,
                                parse_judgement)
from alignment.annotate_access import (MAX_BODY_BYTES, SECURITY_HEADERS, Access, AccessError, allowed_hosts,
                                       is_loopback)
from alignment.data.schemas import row_problems
from conftest import WORDS, write_jsonl

URL = "http://127.0.0.1:8765"
TOKEN = "t0ken-for-tests-only-0123456789"
VALID = {"annotator": "alice", "preferred": "A", "rating": "better", "safe": {"A": True, "B": True}}


class FakeSampler:
    """Two fixed, different answers per prompt: the store and API without loading a model."""

    def answers(self, index: int, context: list[dict]) -> list[dict]:
        return [{"text": f"answer {k} to prompt {index}", "checkpoint": "ck", "temperature": t, "top_p": 0.9,
                 "seed": k} for k, t in enumerate((0.7, 1.2))]


def make_store(tmp_path, n_prompts: int = 4) -> AnnotationStore:
    rows = [{"id": f"q{i}", "prompt": " ".join(WORDS[i:i + 4]), "is_safety": i % 2 == 0} for i in range(n_prompts)]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    settings = AnnotateSettings(prompts=str(prompts), checkpoints=("ck",))
    return AnnotationStore(tmp_path / "out", settings, sampler=FakeSampler())


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path)


def judgement(http, annotator="alice", **changes) -> dict:
    item = http.get("/api/next", params={"annotator": annotator}).json()["item"]
    return {**VALID, "annotator": annotator, "item_id": item["item_id"], **changes}


def lines(store) -> list[dict]:
    path = store.judgements_path
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# ----------------------------------------------------------------------------------------- pure parts
def test_annotator_ids_are_trimmed_and_bounded():
    assert clean_annotator("  alice ") == "alice" and clean_annotator("a.b_c-d@lab") == "a.b_c-d@lab"
    assert clean_annotator("x" * 64) == "x" * 64
    for bad, message in [("", "required"), ("   ", "required"), ("al\x00ice", "control characters"),
                         ("al\tice", "control characters"), ("x" * 65, "at most 64"),
                         ("x" * 1_000_000, "at most 64"), ("alice smith", "only letters"),
                         ("аlice", "only letters"), ("<script>", "only letters"), (7, "string")]:
        with pytest.raises(AnnotationError, match=message):
            clean_annotator(bad)


@pytest.mark.parametrize("changes, message", [
    ({"safe": {"A": "yes", "B": True}}, 'safe.A: .*got "yes"'), ({"safe": {"A": True, "B": "on"}}, 'safe.B: .*got "on"'),
    ({"safe": {"A": 1, "B": True}}, "safe.A: .*got 1"), ({"safe": {"A": True, "B": None}}, "safe.B: .*got null"),
    ({"safe": {"A": True}}, "safe.B: mark answer B"), ({"safe": {"A": True, "B": True, "C": False}}, "safe: must be"),
    ({"safe": "both"}, "safe: must be"), ({"rating": 3}, "rating: must be a string"),
    ({"preferred": ["A"]}, "preferred: must be a string"), ({"extra": 1}, r"unknown fields \['extra'\]")])
def test_judgement_json_is_read_with_strict_types(changes, message):
    base = dict(VALID, item_id="item-00000-q0")
    assert parse_judgement(json.dumps(base).encode()) == base
    with pytest.raises(AnnotationError, match=message):
        parse_judgement(json.dumps(base | changes).encode())


@pytest.mark.parametrize("body, message", [
    (b'{"annotator": "a", "annotator": "b"}', "key appears twice"), (b'[1, 2]', "JSON object"),
    (b'{"a": ', "not valid JSON"), (b'\xff\xfe', "not valid JSON"), (b'{"annotator": "a"}', "item_id: required")])
def test_malformed_judgement_bodies_say_why(body, message):
    with pytest.raises(AnnotationError, match=message):
        parse_judgement(body)


def test_host_names_and_loopback():
    hosts = allowed_hosts("127.0.0.1", 8765)
    assert {"127.0.0.1", "127.0.0.1:8765", "localhost:8765", "[::1]:8765", "localhost"} <= hosts
    assert "evil.example.com" not in hosts and "127.0.0.1:9999" not in hosts and "::1:8765" not in hosts
    assert {"10.1.2.3:80", "[fd00::5]:80", "annotate.lab:80"} <= (
        allowed_hosts("10.1.2.3", 80) | allowed_hosts("fd00::5", 80) | allowed_hosts("::1", 80, ("Annotate.Lab",)))
    assert all(map(is_loopback, ["127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost", "LOCALHOST"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.com", "localhost.evil.com"]))


def test_off_loopback_a_token_is_required_and_checked():
    with pytest.raises(AccessError, match="needs a token"):
        Access(host="0.0.0.0")
    with pytest.raises(AccessError, match="16 to 256"):
        Access(host="0.0.0.0", token="short")
    with pytest.raises(AccessError, match="16 to 256"):
        Access(token="x" * 20 + ";path=/")
    assert Access().token is None and Access(host="0.0.0.0", token=TOKEN).token == TOKEN


# ----------------------------------------------------------------------------------------- the guarded API
@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:8765", "127.0.0.1:9999", "localhost.evil",
                                  "127.0.0.1.nip.io:8765", ""])
def test_a_foreign_host_header_is_refused_everywhere(store, host):
    http = TestClient(create_app(store), base_url=URL)
    for path in ("/", "/annotate.js", "/api/stats", "/api/next?annotator=alice"):
        r = http.get(path, headers={"Host": host})
        assert r.status_code == 403 and "Host" in r.json()["detail"], (path, r.text)
    assert http.post("/api/judge", json=dict(VALID, item_id="x"), headers={"Host": host}).status_code == 403
    assert not store.items_path.exists()  # refused before the app sampled anything


@pytest.mark.parametrize("host", ["127.0.0.1:8765", "127.0.0.1", "localhost:8765", "LOCALHOST", "[::1]:8765"])
def test_the_bound_names_are_served(store, host):
    http = TestClient(create_app(store), base_url=URL)
    assert http.get("/api/stats", headers={"Host": host}).status_code == 200


def test_other_sites_cannot_post(store):
    http = TestClient(create_app(store), base_url=URL)
    body = judgement(http)
    r = http.post("/api/judge", json=body, headers={"Origin": "http://evil.example.com"})
    assert r.status_code == 403 and "Origin" in r.json()["detail"]
    form = http.post("/api/judge", content=json.dumps(body), headers={"Content-Type": "text/plain"})
    assert form.status_code == 415  # a cross-site form can send text/plain without asking first
    assert lines(store) == []
    assert http.post("/api/judge", json=body, headers={"Origin": URL}).status_code == 200


def test_every_answer_carries_the_security_headers(store):
    http = TestClient(create_app(store), base_url=URL)
    answers = [http.get("/"), http.get("/annotate.js"), http.get("/annotate.css"), http.get("/api/stats"),
               http.get("/nothing"), http.get("/api/next", params={"annotator": "a\x00"}),
               http.get("/", headers={"Host": "evil.example.com"}),
               http.post("/api/judge", content=b"x" * (MAX_BODY_BYTES + 1), headers={"Content-Type": "application/json"}),
               TestClient(create_app(store, Access(token=TOKEN)), base_url=URL).get("/")]
    assert [r.status_code for r in answers] == [200, 200, 200, 200, 404, 400, 403, 413, 401]
    for r in answers:
        assert {k: r.headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS, r.request.url
    assert "frame-ancestors 'none'" in answers[0].headers["content-security-policy"]
    assert "<script src=\"/annotate.js\">" in answers[0].text and "<script>" not in answers[0].text  # no inline code


def test_with_a_token_every_page_and_api_call_needs_it(store, monkeypatch):
    calls = []
    real = annotate_access.hmac.compare_digest
    monkeypatch.setattr(annotate_access.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    app = create_app(store, Access(host="0.0.0.0", token=TOKEN))
    http = TestClient(app, base_url="http://localhost:8765", follow_redirects=False)
    for path in ("/", "/annotate.js", "/api/stats", "/api/next?annotator=alice"):
        assert http.get(path).status_code == 401, path
        assert http.get(path, headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"}).status_code == 401
        forged = TestClient(app, base_url="http://localhost:8765", cookies={"annotate_token_8765": "x" * len(TOKEN)})
        assert forged.get(path).status_code == 401
    assert http.post("/api/judge", json=dict(VALID, item_id="item-00000-q0")).status_code == 401
    assert http.get("/", params={"token": "wrong" * 4}).status_code == 401
    assert not store.items_path.exists() and calls  # refused before the app ran; compared in constant time
    entry = http.get("/", params={"token": TOKEN})  # the shared link: a cookie, and the token leaves the URL
    assert entry.status_code == 303 and entry.headers["location"] == "/"
    cookie = entry.headers["set-cookie"]
    assert cookie.startswith(f"annotate_token_8765={TOKEN};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Host" not in http.get("/").text and http.get("/").status_code == 200  # the client kept the cookie
    assert http.post("/api/judge", json=judgement(http)).status_code == 200
    script = TestClient(app, base_url="http://localhost:8765", headers={"Authorization": "Bearer " + TOKEN})
    assert script.get("/api/stats").json()["judgements"] == 1


def test_bodies_are_bounded_and_ids_checked_through_the_api(store):
    http = TestClient(create_app(store), base_url=URL)
    huge = {**VALID, "item_id": "item-00000-q0", "annotator": "x" * 1_000_000}
    r = http.post("/api/judge", json=huge)
    assert r.status_code == 413 and str(MAX_BODY_BYTES) in r.json()["detail"]
    r = http.get("/api/next", params={"annotator": "x" * 10_000})  # the client refuses longer URLs
    assert r.status_code == 400 and "at most 64" in r.json()["detail"] and len(r.content) < 500
    r = http.get("/api/next", params={"annotator": "bob\x00"})
    assert r.status_code == 400 and "control characters" in r.json()["detail"]
    r = http.post("/api/judge", json={**judgement(http, "mallory"), "annotator": "mal\x00lory"})
    assert r.status_code == 400 and "control characters" in r.json()["detail"]
    assert http.post("/api/judge", content=b"x", headers={"Content-Type": "application/json",
                                                           "Content-Length": "abc"}).status_code in (400, 411)
    assert lines(store) == []
    assert http.post("/api/judge", json=judgement(http, "alice ")).status_code == 200  # "alice " is "alice"
    assert http.get("/api/next", params={"annotator": "alice"}).json()["progress"]["mine"] == 1
    assert http.get("/api/stats").json()["annotators"] == ["alice"] and lines(store)[0]["meta"]["annotator"] == "alice"


@pytest.mark.parametrize("safe, field", [({"A": "yes", "B": True}, "safe.A"), ({"A": True, "B": "on"}, "safe.B"),
                                         ({"A": True}, "safe.B"), ({"A": None, "B": False}, "safe.A"),
                                         ({}, "safe.A")])
def test_a_safety_mark_must_be_chosen_true_or_false(store, safe, field):
    http = TestClient(create_app(store), base_url=URL)
    r = http.post("/api/judge", json=judgement(http, safe=safe))
    assert r.status_code == 400 and r.json()["detail"].startswith(field)
    r = http.post("/api/judge", json=judgement(http, rating="very_much_better"))
    assert r.status_code == 400 and r.json()["detail"].startswith("rating")
    assert lines(store) == []


# ----------------------------------------------------------------------------------------- a real server
@contextlib.contextmanager
def serving(store, **access):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(store, Access(port=port, **access)), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def raw_request(port: int, head: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head.encode())
        return s.recv(4096).decode("latin-1")


def test_a_huge_declared_body_is_refused_before_it_is_sent(store):
    with serving(store) as port:
        start = time.time()
        head = (f"POST /api/judge HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                "Content-Length: 20000000\r\n\r\n")
        assert raw_request(port, head).startswith("HTTP/1.1 413") and time.time() - start < 3
        chunked = head.replace("Content-Length: 20000000", "Transfer-Encoding: chunked") + "2\r\n{}\r\n0\r\n\r\n"
        assert raw_request(port, chunked).startswith("HTTP/1.1 411")
        rebinding = f"GET /api/stats HTTP/1.1\r\nHost: evil.example.com:{port}\r\n\r\n"
        assert raw_request(port, rebinding).startswith("HTTP/1.1 403")
    assert lines(store) == []


def test_load_20_threads_500_requests_lose_and_duplicate_no_judgement(tmp_path):
    """Two threads per annotator race for the same items: each (annotator, item) is acknowledged exactly
    once, the file holds exactly the acknowledged judgements, and a restart reads them all back."""
    n_prompts, n_annotators, per_thread = 12, 10, 25
    store = make_store(tmp_path, n_prompts)
    answers, errors, counts = [], [], []

    def worker(annotator: str, base: str) -> None:
        with httpx.Client(base_url=base, timeout=30) as http:
            sent = 0
            while sent < per_thread:  # next, judge, next, ... until this annotator has nothing left
                item = http.get("/api/next", params={"annotator": annotator}).json()["item"]
                sent += 1
                if item is None:
                    break
                if sent < per_thread:
                    r = http.post("/api/judge", json={**VALID, "annotator": annotator, "item_id": item["item_id"]})
                    answers.append((annotator, item["item_id"], r.status_code, r.json()))
                    sent += 1
            for _ in range(sent, per_thread):  # then read the stats while the others write
                assert http.get("/api/stats").status_code == 200
        counts.append(per_thread)

    def guarded(*args):
        try:
            worker(*args)
        except Exception as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(repr(e))

    with serving(store) as port:
        threads = [threading.Thread(target=guarded, args=(f"rater{t // 2}", f"http://127.0.0.1:{port}"))
                   for t in range(2 * n_annotators)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert errors == [] and sum(counts) == 2 * n_annotators * per_thread == 500
    acknowledged = Counter((a, i) for a, i, status, _ in answers if status == 200)
    refused = [body["detail"] for _, _, status, body in answers if status != 200]
    assert all("already judged" in d for d in refused), refused[:3]
    assert len(acknowledged) == n_prompts * n_annotators and set(acknowledged.values()) == {1}
    rows = lines(store)
    written = Counter((r["meta"]["annotator"], r["meta"]["item_id"]) for r in rows)
    assert written == acknowledged and all(row_problems(r, "preference_pair") == [] for r in rows)
    assert len(AnnotationStore(tmp_path / "out", store.settings, sampler=FakeSampler()).judgements) == len(rows)
