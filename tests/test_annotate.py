"""`align annotate`: the judgement rows, the append-only store, the web API, an RM trained on the result,
and one end-to-end click-through in headless Chromium (skipped with the reason when no browser exists)."""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from alignment.annotate import (AnnotateSettings, AnnotationError, AnnotationStore,
                                append_jsonl, create_app, judgement_row, repair_jsonl, safety_category,
                                shown_order)
from alignment.annotate_access import Access
from alignment.data.schemas import row_problems
from conftest import WORDS, write_jsonl

LOOPBACK_URL = "http://127.0.0.1:8765"  # the default bind: a Host header the access guard accepts
ITEM = {"item_id": "item-00000-p0", "prompt_id": "p0", "is_safety": True, "prompt": "how do I do it",
        "answers": [{"text": "first answer", "checkpoint": "ck1", "temperature": 0.7, "top_p": 0.9, "seed": 1},
                    {"text": "second answer", "checkpoint": "ck2", "temperature": 1.2, "top_p": 0.9, "seed": 2}]}


def annotator_with_order(order: tuple[int, int]) -> str:
    return next(name for name in (f"ann{i}" for i in range(100)) if shown_order(name, ITEM["item_id"]) == order)


# ----------------------------------------------------------------------------------------- pure functions
def test_shown_order_is_stable_and_both_orders_occur():
    orders = [shown_order(f"ann{i}", "item-1") for i in range(40)]
    assert set(orders) == {(0, 1), (1, 0)}
    assert orders == [shown_order(f"ann{i}", "item-1") for i in range(40)]


def test_judgement_maps_the_shown_slots_back_to_the_sampled_answers():
    swapped = annotator_with_order((1, 0))  # this annotator sees the second answer as A
    row = judgement_row(ITEM, swapped, "A", "better", {"A": True, "B": False}, when=5.0)
    assert (row["chosen"], row["rejected"]) == ("second answer", "first answer")
    assert (row["chosen_safe"], row["rejected_safe"], row["category"]) == (True, False, "only_chosen_safe")
    assert row["meta"]["chosen_from"]["checkpoint"] == "ck2" and row["meta"]["chosen_answer"] == 1
    assert row["kind"] == "safety" and row["meta"]["annotator"] == swapped and row["meta"]["time"] == 5.0
    assert row_problems(row, "preference_pair") == []
    straight = annotator_with_order((0, 1))
    row = judgement_row(ITEM, straight, "A", "unsure", {"A": True, "B": True})
    assert row["chosen"] == "first answer" and row["category"] == "both_safe" and row["rating"] == "unsure"


def test_safety_categories_and_the_refused_case():
    assert safety_category(True, True) == "both_safe"
    assert safety_category(True, False) == "only_chosen_safe"
    assert safety_category(False, False) == "both_unsafe"
    with pytest.raises(AnnotationError, match="safer answer is preferred"):
        safety_category(False, True)


@pytest.mark.parametrize("bad, match", [
    (dict(preferred="C"), "preferred"), (dict(rating="much_better"), "rating"),
    (dict(safe={"A": True}), "safe"), (dict(annotator=" "), "annotator")])
def test_bad_judgements_say_which_field(bad, match):
    args = dict(annotator="x", preferred="A", rating="better", safe={"A": True, "B": True}) | bad
    with pytest.raises(AnnotationError, match=match):
        judgement_row(ITEM, args["annotator"], args["preferred"], args["rating"], args["safe"])


def test_a_torn_last_line_is_cut_and_whole_lines_kept(tmp_path):
    path = tmp_path / "j.jsonl"
    append_jsonl(path, {"a": 1})
    append_jsonl(path, {"b": 2})
    with open(path, "ab") as f:
        f.write(b'{"c": 3')  # a kill in the middle of a write
    assert repair_jsonl(path) == len(b'{"c": 3')
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}, {"b": 2}]
    assert repair_jsonl(path) == 0


# ----------------------------------------------------------------------------------------- the store and API
@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"id": f"q{i}", "prompt": " ".join(WORDS[i:i + 4]), "is_safety": i % 3 == 0} for i in range(8)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def settings(prompts, checkpoint, **kw) -> AnnotateSettings:
    return AnnotateSettings(prompts=str(prompts), checkpoints=(str(checkpoint),), max_new_tokens=12, **kw)


@pytest.fixture
def client(tmp_path, prompts_file, nano_model_dir):
    from fastapi.testclient import TestClient

    store = AnnotationStore(tmp_path / "out", settings(prompts_file, nano_model_dir))
    return TestClient(create_app(store), base_url=LOOPBACK_URL), store


def judge_next(client, annotator: str, preferred="A", rating="better", safe=None):
    item = client.get("/api/next", params={"annotator": annotator}).json()["item"]
    body = {"annotator": annotator, "item_id": item["item_id"], "preferred": preferred, "rating": rating,
            "safe": safe or {"A": True, "B": True}}
    return item, client.post("/api/judge", json=body)


def test_api_serves_pairs_and_appends_schema_valid_rows(client):
    http, store = client
    assert "Which answer is better?" in http.get("/").text
    item, r = judge_next(http, "alice", preferred="B", rating="slightly_better", safe={"A": False, "B": True})
    assert r.status_code == 200, r.text
    assert item["answers"]["A"] != item["answers"]["B"]
    rows = [json.loads(line) for line in store.judgements_path.read_text().splitlines()]
    assert len(rows) == 1 and row_problems(rows[0], "preference_pair") == []
    assert rows[0]["chosen"] == item["answers"]["B"] and rows[0]["rejected"] == item["answers"]["A"]
    assert rows[0]["meta"]["chosen_from"]["temperature"] in (0.7, 1.2)
    assert rows[0]["meta"]["chosen_from"]["checkpoint"] == store.settings.checkpoints[0]
    nxt = http.get("/api/next", params={"annotator": "alice"}).json()
    assert nxt["item"]["item_id"] != item["item_id"] and nxt["progress"]["mine"] == 1


def test_api_refuses_bad_and_repeated_judgements_without_writing(client):
    http, store = client
    item, r = judge_next(http, "bob", preferred="A", safe={"A": False, "B": True})
    assert r.status_code == 400 and "safer answer" in r.json()["detail"]
    body = {"annotator": "bob", "item_id": item["item_id"], "preferred": "A", "rating": "better",
            "safe": {"A": True, "B": True}}
    assert http.post("/api/judge", json=body).status_code == 200
    again = http.post("/api/judge", json=body)
    assert again.status_code == 400 and "already judged" in again.json()["detail"]
    unknown = http.post("/api/judge", json=body | {"item_id": "item-99999-x"})
    assert unknown.status_code == 400 and "item_id" in unknown.json()["detail"]
    assert len(store.judgements_path.read_text().splitlines()) == 1


def test_restart_resumes_each_annotator_and_two_annotators_give_agreement(tmp_path, client, prompts_file,
                                                                          nano_model_dir):
    http, store = client
    first, _ = judge_next(http, "alice")
    judge_next(http, "alice")
    judge_next(http, "bob")
    items_before = store.items_path.read_text()
    with open(store.judgements_path, "ab") as f:
        f.write(b'{"id": "torn')  # killed mid-write: never acknowledged
    from fastapi.testclient import TestClient

    store2 = AnnotationStore(tmp_path / "out", settings(prompts_file, nano_model_dir))
    assert store2.repaired == len(b'{"id": "torn') and len(store2.judgements) == 3  # exactly the torn bytes cut
    http2 = TestClient(create_app(store2), base_url=LOOPBACK_URL)
    alice_next = http2.get("/api/next", params={"annotator": "alice"}).json()["item"]
    bob_next = http2.get("/api/next", params={"annotator": "bob"}).json()["item"]
    assert alice_next["item_id"] == store2.item_id(2) and bob_next["item_id"] == store2.item_id(1)
    assert store2.items_path.read_text().startswith(items_before)  # the same answers, never re-sampled
    stats = http2.get("/api/stats").json()
    agreement = stats["agreement"]
    assert agreement["items_judged_twice_or_more"] == 1 and agreement["annotator_pairs"] == 1
    assert agreement["preference_agreement"] in (0.0, 1.0) and agreement["annotators"] == 2
    assert stats["annotators"] == ["alice", "bob"] and first["item_id"] == store2.item_id(0)


def test_restart_with_other_settings_is_refused(tmp_path, client, prompts_file, nano_model_dir):
    with pytest.raises(AnnotationError, match="other settings"):
        AnnotationStore(tmp_path / "out", settings(prompts_file, nano_model_dir, temperatures=(0.5, 1.0)))


def test_the_collected_file_trains_a_reward_model(tmp_path, client):
    from alignment.config import RMConfig, load_config
    from alignment.stages.reward_model import run_rm

    http, store = client
    for _ in range(6):
        judge_next(http, "alice", rating="better")
    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes/tiny/rm_annotated.yaml").read_text())
    recipe["model"]["path"] = store.settings.checkpoints[0]
    recipe["data"]["primary"] = [{"path": str(store.judgements_path)}]
    recipe["data"]["test"] = {"annotated": [{"path": str(store.judgements_path)}]}
    recipe["output"]["dir"] = str(tmp_path / "rm")
    recipe["logging"] = {"every_steps": 1, "progress": False, "tensorboard": False}
    recipe["train"]["micro_batch_size"] = 2
    path = tmp_path / "rm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    summary = run_rm(load_config(RMConfig, path))
    assert (tmp_path / "rm" / "done.json").is_file()
    assert json.loads((tmp_path / "rm" / "mix.json").read_text())["counts"]["total"] == 6
    assert summary["eval"]["annotated"]["count"] == 6


# ----------------------------------------------------------------------------------------- in a browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def test_rate_a_pair_in_headless_chromium(tmp_path, prompts_file, nano_model_dir):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium on this machine: `make install-browser` installs Debian's chromium")
    import uvicorn

    store = AnnotationStore(tmp_path / "out", settings(prompts_file, nano_model_dir))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(store, Access(port=port)), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#annotator", "carol")
            page.click("#start")
            page.wait_for_selector("#answer-A:not(:empty)")
            shown_a = page.inner_text("#answer-A")
            page.click("#submit")  # nothing picked yet: the page says so and writes nothing
            assert "Pick the better answer" in page.inner_text("#error")
            page.check("#prefer-A")
            page.check("#rating-significantly_better")
            page.click("#submit")  # no safety mark starts chosen: the page asks for both
            assert "Mark each answer safe or unsafe" in page.inner_text("#error")
            assert not page.is_checked("#safe-A-yes") and not page.is_checked("#safe-B-yes")
            page.check("#safe-A-yes")
            page.check("#safe-B-no")
            page.click("#submit")
            page.wait_for_selector("#saved:not(:empty)")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    rows = [json.loads(line) for line in store.judgements_path.read_text().splitlines()]
    assert len(rows) == 1 and row_problems(rows[0], "preference_pair") == []
    assert rows[0]["meta"]["annotator"] == "carol" and rows[0]["rating"] == "significantly_better"
    assert rows[0]["chosen"] == shown_a.strip() and rows[0]["category"] == "only_chosen_safe"
