"""`align annotate`: collect preference pairs from people, with the paper's protocol (paper 3.2.1;
docs/method.md#preference-data).

An annotator sees a prompt and two sampled answers (one checkpoint at two temperatures, or two
checkpoints), shown in an order drawn per annotator and item; picks the better one; rates how much better
(significantly / better / slightly / negligibly better, or unsure); and marks each answer safe or unsafe.
A pair where the preferred answer is unsafe and the other safe is refused, as the paper excludes it.

Files under `--out` (all append-only, one JSON object per line):

    settings.json      prompts file, checkpoints, sampling settings; a restart must use the same ones
    items.jsonl        the two answers sampled for each prompt, written once, so every annotator and every
                       restart sees the same pair
    judgements.jsonl   one `preference_pair` row per judgement (annotator, time, checkpoints, sampling
                       settings in `meta`): `align rm` reads this file as it is

Each line is written with one `write` on an O_APPEND descriptor and fsynced before the answer is
acknowledged; a torn last line (a kill mid-write) is cut off at start-up. A restarted app reads the
judgements back, so every annotator resumes at their first unjudged item.

Annotator ids are trimmed and must be 1 to 64 characters from A-Z a-z 0-9 . _ - @; a judgement's JSON is
read with strict types (booleans are true/false, never "yes"), and both safety marks must be chosen.

The web app is FastAPI (`create_app`) behind the access guard of `annotate_access.py` (Host check, token
off loopback, bounded bodies, security headers); the page is `alignment/static/annotate.{html,js,css}`.
"""

import hashlib
import json
import os
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from alignment.annotate_access import WILDCARDS, Access, AccessGuard, is_loopback, new_token, primary_address
from alignment.chat import encode_prompt
from alignment.chat_session import load_policy
from alignment.data.io import load_records
from alignment.data.schemas import RATINGS, category_of, prompt_context, row_problems
from alignment.data.stats import annotator_agreement
from alignment.generation import generate
from alignment.runs import write_json_atomic

SLOTS = ("A", "B")
ANNOTATOR_MAX = 64
ANNOTATOR_PATTERN = re.compile(r"[A-Za-z0-9._@-]+")  # ASCII only: no look-alike letters make two "alice"s
JUDGEMENT_FIELDS = ("annotator", "item_id", "preferred", "rating", "safe")


class AnnotationError(ValueError):
    """A judgement or a set-up the app refuses (the message says why)."""


# ---------------------------------------------------------------- pure functions


def clean_annotator(raw: str) -> str:
    """The annotator id, trimmed: 1 to 64 characters from A-Z a-z 0-9 . _ - @ (so `alice ` is `alice`)."""
    if not isinstance(raw, str):
        raise AnnotationError("annotator: must be a string")
    name = raw.strip()
    if not name:
        raise AnnotationError("annotator: an annotator id is required")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise AnnotationError("annotator: control characters (NUL, tab, newline, ...) are not allowed")
    if len(name) > ANNOTATOR_MAX:
        raise AnnotationError(f"annotator: at most {ANNOTATOR_MAX} characters, got {len(name)}")
    if not ANNOTATOR_PATTERN.fullmatch(name):
        raise AnnotationError("annotator: use only letters A-Z a-z, digits and . _ - @")
    return name


def parse_judgement(body: bytes) -> dict:
    """The fields of a POSTed judgement, with strict JSON types: strings, and `safe` as {"A": true|false,
    "B": true|false} (no "yes", 1 or null; a missing mark is refused, never assumed)."""
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise AnnotationError(f"body: a key appears twice ({sorted(k for k in set(keys) if keys.count(k) > 1)})")
        return dict(pairs)

    try:
        data = json.loads(body, object_pairs_hook=no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"body: not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(data, dict):
        raise AnnotationError("body: must be a JSON object")
    unknown = sorted(set(data) - set(JUDGEMENT_FIELDS))
    missing = [f for f in JUDGEMENT_FIELDS if f not in data]
    if unknown or missing:
        raise AnnotationError(f"body: unknown fields {unknown}" if unknown else f"{missing[0]}: required")
    for field in JUDGEMENT_FIELDS[:4]:
        if not isinstance(data[field], str):
            raise AnnotationError(f"{field}: must be a string, got {type(data[field]).__name__}")
    safe = data["safe"]
    if not isinstance(safe, dict) or set(safe) - set(SLOTS):
        raise AnnotationError('safe: must be {"A": true|false, "B": true|false}')
    for slot in SLOTS:
        if not isinstance(safe.get(slot), bool):
            raise AnnotationError(f"safe.{slot}: mark answer {slot} safe (true) or unsafe (false), got "
                                  f"{json.dumps(safe.get(slot))}")
    return data


def shown_order(annotator: str, item_id: str) -> tuple[int, int]:
    """Which answer is shown as A and which as B, for this annotator and item (stable across restarts)."""
    digest = hashlib.sha256(f"{annotator}\0{item_id}".encode()).digest()
    return (1, 0) if digest[0] & 1 else (0, 1)


def safety_category(chosen_safe: bool, rejected_safe: bool) -> str:
    """The paper's three safety bins; the fourth case (only the rejected answer safe) is refused."""
    category = category_of(chosen_safe, rejected_safe)
    if category is not None:
        return category
    raise AnnotationError("the preferred answer is marked unsafe and the other safe: the protocol keeps only "
                          "pairs where the safer answer is preferred (pick the safe one, or fix a safety mark)")


def judgement_row(item: dict, annotator: str, preferred: str, rating: str, safe: dict[str, bool],
                  when: float | None = None) -> dict:
    """The `preference_pair` row of one judgement. `preferred` and `safe` use the shown slots (A/B)."""
    annotator = clean_annotator(annotator)
    if preferred not in SLOTS:
        raise AnnotationError(f"preferred: must be 'A' or 'B', got {preferred!r}")
    if rating not in RATINGS:
        raise AnnotationError(f"rating: must be one of {', '.join(RATINGS)}, got {rating!r}")
    if set(safe) != set(SLOTS) or not all(isinstance(v, bool) for v in safe.values()):
        raise AnnotationError("safe: needs a true/false mark for both A and B")
    order = shown_order(annotator, item["item_id"])  # order[slot] = index into item["answers"]
    win_slot = SLOTS.index(preferred)
    chosen, rejected = item["answers"][order[win_slot]], item["answers"][order[1 - win_slot]]
    chosen_safe, rejected_safe = safe[SLOTS[win_slot]], safe[SLOTS[1 - win_slot]]
    row = {"id": f"{item['item_id']}--{annotator}"}
    row.update({"prompt": item["prompt"]} if "prompt" in item else {"context": item["context"]})
    row.update({
        "chosen": chosen["text"], "rejected": rejected["text"], "rating": rating,
        "kind": "safety" if item["is_safety"] else "helpfulness",
        "chosen_safe": chosen_safe, "rejected_safe": rejected_safe,
        "category": safety_category(chosen_safe, rejected_safe), "source": "annotate",
        "meta": {"annotator": annotator, "time": round(time.time() if when is None else when, 3),
                 "item_id": item["item_id"], "prompt_id": item["prompt_id"],
                 "chosen_answer": order[win_slot], "shown_first": order[0],
                 "chosen_from": {k: chosen[k] for k in ("checkpoint", "temperature", "top_p", "seed")},
                 "rejected_from": {k: rejected[k] for k in ("checkpoint", "temperature", "top_p", "seed")}},
    })
    problems = row_problems(row, "preference_pair")
    if problems:  # the sampled answers themselves can be unusable (e.g. empty): say so, never write it
        raise AnnotationError("; ".join(f"{f}: {r}" for f, r in problems))
    return row


# ---------------------------------------------------------------- the append-only files


def repair_jsonl(path: Path) -> int:
    """Cut a torn last line (no newline: a kill mid-write, never acknowledged); returns the bytes removed."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep == len(data):
        return 0
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(data) - keep


def append_jsonl(path: Path, row: dict) -> None:
    """Append one row with a single write on an O_APPEND descriptor, fsynced before returning."""
    line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"{path}: short write ({written} of {len(line)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{path}:{n}: row: not valid JSON ({e.msg})") from None
    return rows


# ---------------------------------------------------------------- sampling the pairs


@dataclass(frozen=True)
class AnnotateSettings:
    prompts: str
    checkpoints: tuple[str, ...]  # one (two temperatures) or two (one answer each)
    temperatures: tuple[float, float] = (0.7, 1.2)
    top_p: float = 0.9
    max_new_tokens: int = 128
    seed: int = 0

    def check(self) -> None:
        if len(self.checkpoints) not in (1, 2):
            raise AnnotationError(f"checkpoints: give one or two, got {len(self.checkpoints)}")
        if len(self.temperatures) != 2 or min(self.temperatures) < 0:
            raise AnnotationError(f"temperatures: give two values >= 0, got {list(self.temperatures)}")
        if len(self.checkpoints) == 1 and self.temperatures[0] == self.temperatures[1] == 0:
            raise AnnotationError("temperatures: one checkpoint at greedy twice gives the same answer twice")


class Sampler:
    """Draws the two answers of an item from the checkpoints (loaded once, lazily)."""

    MAX_TRIES = 4  # re-draws when both answers come out identical

    def __init__(self, settings: AnnotateSettings):
        self.settings = settings
        self._models: dict[str, tuple] = {}

    def _load(self, checkpoint: str):
        if checkpoint not in self._models:
            self._models[checkpoint] = load_policy(checkpoint)
        return self._models[checkpoint]

    def _draw(self, checkpoint: str, temperature: float, context: list[dict], seed: int) -> dict:
        model, tokenizer = self._load(checkpoint)
        sample = generate(model, tokenizer, [encode_prompt(tokenizer, context)], max_new_tokens=self.settings.max_new_tokens,
                          temperature=temperature, top_p=self.settings.top_p, seed=seed)[0][0]
        return {"text": sample.text, "checkpoint": checkpoint, "temperature": temperature,
                "top_p": self.settings.top_p, "seed": seed}

    def answers(self, prompt_index: int, context: list[dict]) -> list[dict] | None:
        """Two different answers, or None when every try gave identical (or empty) texts."""
        s = self.settings
        sources = [s.checkpoints[0], s.checkpoints[-1]]
        for attempt in range(self.MAX_TRIES):
            base = (s.seed * 1_000_003 + prompt_index) * 16 + 2 * attempt
            pair = [self._draw(ckpt, t, context, base + k) for k, (ckpt, t) in enumerate(zip(sources, s.temperatures))]
            texts = [a["text"].strip() for a in pair]
            if texts[0] != texts[1] and all(texts):
                return pair
        return None


class AnnotationStore:
    """The items and judgements of one `--out` directory, safe to use from the app's worker threads."""

    def __init__(self, out_dir: str | Path, settings: AnnotateSettings, sampler: Sampler | None = None):
        settings.check()
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self._check_settings()
        self.prompts = load_records(settings.prompts, "rl_prompt")
        self.sampler = sampler or Sampler(settings)
        self.items_path, self.judgements_path = self.out / "items.jsonl", self.out / "judgements.jsonl"
        self.repaired = repair_jsonl(self.items_path) + repair_jsonl(self.judgements_path)
        self.items = {row["item_id"]: row for row in read_jsonl(self.items_path)}
        self.judgements = read_jsonl(self.judgements_path)
        self.done = {(r["meta"]["annotator"], r["meta"]["item_id"]) for r in self.judgements}
        self._lock = threading.Lock()

    def _check_settings(self) -> None:
        path = self.out / "settings.json"
        mine = json.loads(json.dumps(asdict(self.settings)))
        if path.is_file():
            theirs = json.loads(path.read_text())
            if theirs != mine:
                diff = {k: (theirs.get(k), mine.get(k)) for k in mine if theirs.get(k) != mine.get(k)}
                raise AnnotationError(f"{self.out} was started with other settings {diff} (was, now): use the same "
                                      "ones to resume, or another --out")
        else:
            write_json_atomic(path, mine)

    def item_id(self, index: int) -> str:
        return f"item-{index:05d}-{self.prompts[index]['id']}"

    def _item(self, index: int) -> dict | None:
        """The item of prompt `index`, sampled and written the first time it is needed."""
        item_id = self.item_id(index)
        if item_id not in self.items:
            prompt = self.prompts[index]
            answers = self.sampler.answers(index, prompt_context(prompt))
            item = {"item_id": item_id, "prompt_id": prompt["id"], "is_safety": prompt["is_safety"],
                    "answers": answers, "skipped": answers is None}
            item.update({"prompt": prompt["prompt"]} if "prompt" in prompt else {"context": prompt["context"]})
            append_jsonl(self.items_path, item)
            self.items[item_id] = item
        item = self.items[item_id]
        return None if item["skipped"] else item

    def next_item(self, annotator: str) -> dict | None:
        """The first item this annotator has not judged, as shown to them (answers in their A/B order)."""
        annotator = clean_annotator(annotator)
        with self._lock:
            for index in range(len(self.prompts)):
                if (annotator, self.item_id(index)) in self.done:
                    continue
                item = self._item(index)
                if item is None:
                    continue
                order = shown_order(annotator, item["item_id"])
                shown = {"item_id": item["item_id"], "is_safety": item["is_safety"],
                         "answers": {slot: item["answers"][i]["text"] for slot, i in zip(SLOTS, order)}}
                shown.update({"prompt": item["prompt"]} if "prompt" in item else {"context": item["context"]})
                return shown
        return None

    def judge(self, annotator: str, item_id: str, preferred: str, rating: str, safe: dict[str, bool]) -> dict:
        annotator = clean_annotator(annotator)
        with self._lock:
            if item_id not in self.items or self.items[item_id]["skipped"]:
                raise AnnotationError(f"item_id: no item {item_id!r} has been shown")
            if (annotator, item_id) in self.done:
                raise AnnotationError(f"{annotator!r} has already judged {item_id!r}")
            row = judgement_row(self.items[item_id], annotator, preferred, rating, safe)
            append_jsonl(self.judgements_path, row)
            self.judgements.append(row)
            self.done.add((annotator, item_id))
            return row

    def progress(self, annotator: str | None = None) -> dict:
        with self._lock:
            mine = sum(1 for a, _ in self.done if a == annotator) if annotator else None
            return {"prompts": len(self.prompts), "judgements": len(self.judgements), "mine": mine,
                    "annotators": sorted({a for a, _ in self.done}),
                    "agreement": annotator_agreement(self.judgements)}


# ---------------------------------------------------------------- the web app


def create_app(store: AnnotationStore, access: Access = Access()):
    """The page at / (its script and style beside it), and a small JSON API the page (and tests) use, behind
    the access guard (Host, Origin, token, body size; security headers on every answer)."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, Response

    app = FastAPI(title="align annotate", docs_url=None, redoc_url=None, openapi_url=None)
    static = Path(__file__).parent / "static"
    page = (static / "annotate.html").read_text(encoding="utf-8")
    script, style = ((static / name).read_text(encoding="utf-8") for name in ("annotate.js", "annotate.css"))

    def refused(e: AnnotationError) -> HTTPException:
        return HTTPException(400, str(e))

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/annotate.js")
    def page_script() -> Response:
        return Response(script, media_type="text/javascript")

    @app.get("/annotate.css")
    def page_style() -> Response:
        return Response(style, media_type="text/css")

    @app.get("/api/next")
    def next_item(annotator: str) -> dict:
        try:
            annotator = clean_annotator(annotator)
            item = store.next_item(annotator)
        except AnnotationError as e:
            raise refused(e) from None
        return {"item": item, "progress": store.progress(annotator)}

    @app.post("/api/judge")
    async def judge(request: Request) -> dict:
        try:
            j = parse_judgement(await request.body())
            annotator = clean_annotator(j["annotator"])
            row = await run_in_threadpool(store.judge, annotator, j["item_id"], j["preferred"], j["rating"], j["safe"])
        except AnnotationError as e:
            raise refused(e) from None
        return {"id": row["id"], "progress": await run_in_threadpool(store.progress, annotator)}

    @app.get("/api/stats")
    def stats() -> dict:
        return store.progress()

    return AccessGuard(app, access)


def run_annotate(prompts: str, checkpoints: list[str], out: str, *, host: str = "127.0.0.1", port: int = 8765,
                 temperatures: tuple[float, float] | None = None, top_p: float = 0.9, max_new_tokens: int = 128,
                 seed: int = 0, token: str | None = None, allow_hosts: tuple[str, ...] = ()) -> None:
    """Start the app (blocking) on host:port. Loopback needs no token unless one is given; any other address
    gets `token`, or a new one printed here."""
    import uvicorn

    if temperatures is None:  # one model: a cool and a hot sample; two models: the same temperature
        temperatures = (0.7, 1.2) if len(checkpoints) == 1 else (0.7, 0.7)
    if token is None and not is_loopback(host):
        token = new_token()
    access = Access(host=host, port=port, token=token, allow_hosts=tuple(allow_hosts))  # checks the token
    settings = AnnotateSettings(prompts=str(prompts), checkpoints=tuple(str(c) for c in checkpoints),
                                temperatures=tuple(temperatures), top_p=top_p, max_new_tokens=max_new_tokens,
                                seed=seed)
    for ckpt in settings.checkpoints:
        if not (Path(ckpt) / "config.json").is_file():
            raise FileNotFoundError(f"{ckpt}: not a model checkpoint (no config.json)")
    store = AnnotationStore(out, settings)
    app = create_app(store, access)
    if store.repaired:
        print(f"align annotate: cut {store.repaired} bytes of a torn last line (never acknowledged)")
    done = len(store.judgements)
    name = host if host not in WILDCARDS else primary_address() or socket.gethostname()
    link = f"http://{f'[{name}]' if ':' in name else name}:{port}/" + (f"?token={token}" if token else "")
    print(f"align annotate: {len(store.prompts)} prompts, {done} judgements so far in {store.judgements_path}\n"
          f"open {link} in a browser (Ctrl-C to stop; restarting resumes)")
    if not is_loopback(host):
        print(f"align annotate: WARNING: listening on {host}: anyone who can reach port {port} and has the link can "
              "read every prompt and answer and file judgements. The token travels unencrypted over HTTP: share "
              "the link only on a network you trust, or put a TLS proxy in front.\n"
              f"align annotate: Host names accepted: {', '.join(sorted(app.hosts))} (add one with --allow-host)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
