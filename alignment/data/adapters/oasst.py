"""OpenAssistant oasst1 (hf.co/datasets/OpenAssistant/oasst1).

Two published layouts, both read: message trees (`2023-04-12_oasst_ready.trees.jsonl.gz`: one tree per
line, `{"message_tree_id", "tree_state", "prompt": message}`, each message with `replies`) and flat
messages (the Hugging Face `data/{train,validation}-*.parquet`: one message per row with `message_id`,
`parent_id`, `message_tree_id`). A message has `text`, `role` ("prompter" or "assistant"), `rank` (0 is
best among its siblings; absent when not ranked), `deleted`, `review_result`, `lang`, and `labels`
(`quality` among them: the mean annotator score in [0, 1]).

- sft_dialog: one dialog per tree along its best-ranked branch: from the root, the rank-0 reply (the
  only reply when there is one, unranked), down to a leaf, ending with the last assistant answer.
- preference_pair: every pair of ranked assistant siblings, the better rank chosen, in the context of
  the dialog above them. Rating from the gap of their `quality` labels (thresholds, default 0.5/0.25/0.1),
  "unsure" without labels or when the gap disagrees with the ranking.

Deleted messages, messages that failed review, empty texts and trees not ready for export are dropped
with their sub-trees (counted).
"""
from __future__ import annotations

from itertools import combinations

from alignment.config import RatingThresholds
from alignment.data.adapters.build import assistant, pair_row, rating_bucket, user
from alignment.data.adapters.upstream import BadRow, Converted, FileContext, Records, Skip, need
from alignment.data.schemas import RowError

QUALITY_THRESHOLDS = RatingThresholds(significantly_better=0.5, better=0.25, slightly_better=0.1)
ROLES = {"prompter": "user", "assistant": "assistant"}


class Node:
    __slots__ = ("row_no", "message", "role", "text", "rank", "quality", "children")

    def __init__(self, row_no: int, message: dict, where: str):
        role = need(message, "role", str, where)
        if role not in ROLES:
            raise BadRow(f"{where}.role" if where else "role", f"expected 'prompter' or 'assistant', got {role!r}")
        self.row_no, self.message, self.role = row_no, message, ROLES[role]
        self.text = need(message, "text", str, where).strip()
        rank = message.get("rank")
        self.rank = rank if isinstance(rank, (int, float)) and not isinstance(rank, bool) and rank == rank else None
        self.quality = _quality(message.get("labels"))
        self.children: list[Node] = []

    def dropped_reason(self) -> str | None:
        if self.message.get("deleted") is True:
            return "deleted message"
        if self.message.get("review_result") is False:
            return "message failed review"
        if not self.text:
            return "empty message"
        return None


def _quality(labels) -> float | None:
    """`labels.quality` in either layout: {"quality": {"value": v}} (trees) or {"name": [...], "value": [...]}."""
    if not isinstance(labels, dict):
        return None
    if isinstance(labels.get("name"), list) and isinstance(labels.get("value"), list):
        labels = {n: {"value": v} for n, v in zip(labels["name"], labels["value"])}
    value = labels.get("quality", {}).get("value") if isinstance(labels.get("quality"), dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _tree_from_nested(row_no: int, message: dict, where: str) -> Node:
    node = Node(row_no, message, where)
    replies = message.get("replies", [])
    if not isinstance(replies, list):
        raise BadRow(f"{where}.replies", "expected array")
    node.children = [_tree_from_nested(row_no, m, f"{where}.replies[{i}]") for i, m in enumerate(replies)]
    return node


def read_trees(records: Records, ctx: FileContext) -> tuple[list[Node], list[tuple[int, RowError]]]:
    """Root nodes of every tree in the file (either layout), and the rows that are not oasst messages."""
    roots: list[Node] = []
    errors: list[tuple[int, RowError]] = []
    flat: dict[str, Node] = {}
    parents: dict[str, str | None] = {}
    for row_no, row in records:
        if isinstance(row, RowError):
            errors.append((row_no, row))
            continue
        try:
            if "prompt" in row and "message_tree_id" in row:  # trees layout
                if row.get("tree_state", "ready_for_export") != "ready_for_export":
                    ctx.dropped["tree not ready for export"] += 1
                    continue
                roots.append(_tree_from_nested(row_no, need(row, "prompt", dict), "prompt"))
            else:  # messages layout
                message_id = need(row, "message_id", str)
                parent = row.get("parent_id")
                if parent is not None and not isinstance(parent, str):
                    raise BadRow("parent_id", "expected string or null")
                if row.get("tree_state", "ready_for_export") != "ready_for_export":
                    ctx.dropped["message of a tree not ready for export"] += 1
                    continue
                flat[message_id] = Node(row_no, row, "")
                parents[message_id] = parent
        except BadRow as e:
            errors.append((row_no, RowError(e.field, e.reason)))
    for message_id, parent in parents.items():
        if parent is None:
            roots.append(flat[message_id])
        elif parent in flat:
            flat[parent].children.append(flat[message_id])
        else:
            ctx.dropped["parent message not in the file"] += 1
    return roots, errors


def _prune(node: Node, ctx: FileContext) -> Node | None:
    """`node` without dropped messages (and their sub-trees); None when `node` itself is dropped."""
    reason = node.dropped_reason()
    if reason is not None:
        ctx.dropped[reason] += 1
        return None
    node.children = [c for c in (_prune(c, ctx) for c in node.children) if c is not None]
    return node


def _best_child(node: Node) -> Node | None:
    ranked = [c for c in node.children if c.rank is not None]
    if ranked:
        return min(ranked, key=lambda c: c.rank)
    return node.children[0] if len(node.children) == 1 else None


def _message(node: Node) -> dict:
    return user(node.text) if node.role == "user" else assistant(node.text)


def _pruned_roots(records: Records, ctx: FileContext) -> tuple[list[Node], list[tuple[int, RowError]]]:
    roots, errors = read_trees(records, ctx)
    kept = []
    for root in roots:
        if root.role != "user":
            ctx.dropped["tree starts with an assistant message"] += 1
        elif (pruned := _prune(root, ctx)) is not None:
            kept.append(pruned)
    return kept, errors


def oasst_dialogs(records: Records, ctx: FileContext) -> Converted:
    roots, errors = _pruned_roots(records, ctx)
    yield from errors
    for root in roots:
        path, node = [root], root
        while (node := _best_child(node)) is not None:
            path.append(node)
        while path and path[-1].role != "assistant":
            path.pop()
        if not path:
            ctx.dropped["tree without an answer"] += 1
            continue
        yield root.row_no, {"id": ctx.row_id(root.row_no), "messages": [_message(n) for n in path],
                            "source": "oasst1", "meta": _tree_meta(root)}


def _tree_meta(root: Node) -> dict:
    return {k: root.message[k] for k in ("message_tree_id", "message_id", "lang") if k in root.message}


def oasst_pairs(records: Records, ctx: FileContext) -> Converted:
    roots, errors = _pruned_roots(records, ctx)
    yield from errors
    for root in roots:
        stack: list[tuple[Node, list[Node]]] = [(root, [root])]
        while stack:
            node, path = stack.pop()
            stack.extend((c, [*path, c]) for c in reversed(node.children))
            if node.role != "user":
                continue
            ranked = sorted((c for c in node.children if c.rank is not None and c.role == "assistant"),
                            key=lambda c: c.rank)
            context = [_message(n) for n in path]
            for better, worse in combinations(ranked, 2):
                gap = None if better.quality is None or worse.quality is None else better.quality - worse.quality
                meta = {**_tree_meta(root), "ranks": [better.rank, worse.rank]}
                row_id = ctx.row_id(root.row_no, f"-{_mid(better)}-{_mid(worse)}")
                try:
                    yield root.row_no, pair_row(row_id, context, better.text, worse.text,
                                                rating_bucket(gap, ctx.thresholds), kind="helpfulness",
                                                source="oasst1", meta=meta)
                except Skip as e:
                    ctx.dropped[str(e)] += 1


def _mid(node: Node) -> str:
    return str(node.message.get("message_id", node.row_no))
