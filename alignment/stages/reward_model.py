"""Stage 2: the helpfulness and safety reward models (docs/method.md#reward-models; Llama 2 section 3.2.2).

A scalar-head `AutoModelForSequenceClassification` starts from the SFT checkpoint. Every pair is encoded
with `alignment.scoring.encode_for_reward` (the one RM encoding rejection sampling and PPO use too); a
micro-batch scores its chosen and its rejected answers in one forward pass, packed padding-free, and
`alignment.losses.ranking_loss` with per-pair margins `preference_margin(rating, margin_scale)` gives the
loss. The shared loop (`alignment.training.train`) does ZeRO, resume, checkpoints and logging; one plan
item is one pair, so a step's loss is the mean over its pairs.

At the end the main process evaluates the final model on every `data.test` set: accuracy per rating
bucket and overall (Tables 7 and 8), per safety category, a calibration table and score histograms
(`eval.json`, `scores.png`). `ablation.margin_scales` trains one sub-run per margin scale and compares
them per rating bucket (Table 28: `ablation.json`, `ablation.md`).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from alignment.batching import build_plan, format_truncation, truncation_counts
from alignment.config import RMConfig
from alignment.data.mixing import mix_rm_data
from alignment.data.schemas import RATINGS, pair_context
from alignment.data.sources import load_preference_data, source_hashes
from alignment.distributed import is_main_process, main_process_does, world_size
from alignment.faults import fault_point
from alignment.frozen import weight_share
from alignment.losses import preference_margin, ranking_loss
from alignment.models.loading import check_model_paths, load_reward_model, model_paths
from alignment.models.tokenizer import load_tokenizer, toy_tokenizer_warning
from alignment.rewards import switch_threshold
from alignment.runs import (add_json_to_committed, COMPLETE_MARK, MetricsLog, RunDir, save_pretrained_atomic,
                            write_json_atomic)
from alignment.scoring import (encode_for_reward, packed_features, packed_scores, reward_scores, SAFETY_SWITCH_FILE,
                               switch_text)
from alignment.training import LoopConfig, train, zero3_init

SCHEMA = "preference_pair"


# ----------------------------------------------------------------------------------------- data
def encode_pairs(tokenizer, pairs: list[dict], max_length: int, margin_scale: str) -> list[dict]:
    """One example per pair: chosen and rejected token ids (same context), its rating and margin."""
    return encode_and_count_pairs(tokenizer, pairs, max_length, margin_scale)[0]


def encode_and_count_pairs(tokenizer, pairs: list[dict], max_length: int, margin_scale: str) -> tuple[list[dict], dict]:
    """`encode_pairs` and the truncation counts: a pair is truncated when either of its answers' RM input is
    longer than `max_length` (the start of the dialog is cut, `alignment.scoring.encode_for_reward`)."""
    examples, lengths = [], []
    for row in pairs:
        context = pair_context(row)
        # one token more than kept tells whether the cut removed anything
        chosen = encode_for_reward(tokenizer, context, row["chosen"], max_length + 1)
        rejected = encode_for_reward(tokenizer, context, row["rejected"], max_length + 1)
        lengths.append(max(len(chosen), len(rejected)))
        examples.append({
            "chosen": chosen[-max_length:],
            "rejected": rejected[-max_length:],
            "rating": row["rating"],
            "margin": preference_margin(row["rating"], margin_scale),
        })
    return examples, truncation_counts(lengths, max_length)


def make_plan(cfg: RMConfig, examples: list[dict], world: int):
    """Length-grouped micro-batches of pairs (the plan never packs pairs into rows; `score_pairs` packs a
    micro-batch's answers for its forward); a pair's length is its longer answer."""
    lengths = [max(len(e["chosen"]), len(e["rejected"])) for e in examples]
    return build_plan(lengths, [1] * len(examples), seed=cfg.seed, epochs=cfg.train.epochs,
                      micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum, world=world,
                      packing=False, max_length=cfg.train.max_length, max_steps=cfg.train.max_steps)


# ----------------------------------------------------------------------------------------- the step
def score_pairs(model, examples: list[dict], indices: list[int], pad_id: int,
                attn_implementation: str = "sdpa") -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [N], rejected [N]) scores of pairs `indices` from ONE forward over their 2N answers, packed
    padding-free into rows no longer than the longest (`alignment.scoring.packed_scores`)."""
    n = len(indices)
    seqs = [examples[i]["chosen"] for i in indices] + [examples[i]["rejected"] for i in indices]
    scores = packed_scores(model, seqs, pad_id, attn_implementation).float()
    return scores[:n], scores[n:]


def rm_step_fn(examples: list[dict], pad_id: int, attn_implementation: str = "sdpa"):
    """The RM micro-step: ranking loss of the micro-batch's pairs, summed, over the step's share of pairs."""

    def step(model, rows, scale):
        indices = [i for row in rows for i in row]
        chosen, rejected = score_pairs(model, examples, indices, pad_id, attn_implementation)
        margin = torch.tensor([examples[i]["margin"] for i in indices], device=chosen.device)
        loss, metrics = ranking_loss(chosen, rejected, margin)
        n = len(indices)
        loss_sum = loss * n
        sums = {f"{k}_sum": v * n for k, v in metrics.items() if k != "loss"}
        return loss_sum / scale, {"loss_sum": loss_sum.detach(), **sums}

    return step


def loop_config(cfg: RMConfig) -> LoopConfig:
    return LoopConfig(optim=cfg.optim, schedule=cfg.schedule, train=cfg.train, distributed=cfg.distributed,
                      logging=cfg.logging, output=cfg.output, seed=cfg.seed)


# ----------------------------------------------------------------------------------------- evaluation
def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor, rows: list[dict], bins: int = 5) -> dict:
    """RM accuracy and calibration on one test set, from scores of the gold chosen/rejected answers.

    A pair is right when ``chosen > rejected`` (a tie is wrong). Returns ``count``, ``accuracy``,
    ``by_rating`` ({rating: {accuracy, count}} for every rating, accuracy None when empty),
    ``by_category`` (safety categories found in the rows), ``calibration`` (reliability table of the
    confidence ``c = max(p, 1 - p)`` with ``p = sigmoid(chosen - rejected)``: per bin of c over [0.5, 1],
    mean c and the observed accuracy of the RM's preferred answer; plus the expected calibration error
    ``ece = sum_b n_b / n * |acc_b - conf_b|``) and ``sigmoid_mean`` (mean ``sigmoid(score)`` of chosen,
    rejected and all answers).
    """
    chosen, rejected = chosen.double(), rejected.double()
    correct = (chosen > rejected).tolist()
    result = {"count": len(rows), "accuracy": _mean(correct), "by_rating": group_accuracy(correct, rows, "rating")}
    if any("category" in r for r in rows):
        result["by_category"] = group_accuracy(correct, rows, "category")
    p = torch.sigmoid(chosen - rejected)
    result["calibration"] = reliability_table(p, bins)
    result["sigmoid_mean"] = {"chosen": torch.sigmoid(chosen).mean().item() if rows else None,
                              "rejected": torch.sigmoid(rejected).mean().item() if rows else None,
                              "all": torch.sigmoid(torch.cat([chosen, rejected])).mean().item() if rows else None}
    result["score_mean"] = {"chosen": chosen.mean().item() if rows else None,
                            "rejected": rejected.mean().item() if rows else None}
    return result


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def group_accuracy(correct: list[bool], rows: list[dict], key: str) -> dict:
    """{value: {accuracy, count}} by a row field; for "rating" every rating appears (in the paper's order)."""
    groups: dict[str, list[bool]] = {r: [] for r in RATINGS} if key == "rating" else {}
    for ok, row in zip(correct, rows):
        if key in row:
            groups.setdefault(str(row[key]), []).append(ok)
    return {name: {"accuracy": _mean(v), "count": len(v)} for name, v in groups.items()}


def reliability_table(p: torch.Tensor, bins: int) -> dict:
    """Calibration of p = P(chosen preferred): the RM prefers chosen when p > 0.5 with confidence
    max(p, 1 - p); each bin of confidence compares its mean confidence with its observed accuracy."""
    confidence = torch.maximum(p, 1 - p)
    right = (p > 0.5).double()
    edges = torch.linspace(0.5, 1.0, bins + 1, dtype=torch.float64)
    index = torch.clamp(torch.bucketize(confidence, edges[1:-1], right=True), max=bins - 1)
    table, ece, n = [], 0.0, len(p)
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        conf = confidence[inside].mean().item() if count else None
        acc = right[inside].mean().item() if count else None
        if count:
            ece += count / n * abs(acc - conf)
        table.append({"low": edges[b].item(), "high": edges[b + 1].item(), "count": count,
                      "confidence": conf, "accuracy": acc})
    return {"bins": table, "ece": ece if n else None}


@torch.no_grad()
def evaluate_reward_model(model_dir: str | Path, test_sets: dict[str, list[dict]], *, batch_size: int = 32,
                          max_length: int = 1024, bins: int = 5, plot_path: str | Path | None = None,
                          attn_implementation: str = "sdpa", switch_precision: float = 0.89) -> tuple[dict, dict | None]:
    """Accuracy per rating bucket, per safety category, calibration and score means of a saved RM on each
    test set (preference_pair rows); histograms of chosen/rejected scores to `plot_path` when given.
    Returns (that {test set: metrics}, the safety switch calibrated by `safety_switch_calibration` on every
    labelled test answer, or None where no row has both labels)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), local_files_only=True,
                                                               attn_implementation=attn_implementation)
    if torch.cuda.is_available():
        model = model.cuda()
    model.eval()
    result, scores = {}, {}
    for name, rows in test_sets.items():
        contexts = [pair_context(r) for r in rows]
        both = reward_scores(model, tokenizer, contexts + contexts, [r["chosen"] for r in rows] +
                             [r["rejected"] for r in rows], batch_size=batch_size, max_length=max_length)
        chosen, rejected = both[:len(rows)], both[len(rows):]
        scores[name] = (chosen, rejected)
        result[name] = preference_metrics(chosen, rejected, rows, bins)
    if plot_path is not None and scores:
        plot_score_histograms(scores, plot_path)
    return result, safety_switch_calibration(scores, test_sets, switch_precision)


def safety_switch_calibration(scores: dict[str, tuple[torch.Tensor, torch.Tensor]], test_sets: dict[str, list[dict]],
                              precision: float) -> dict | None:
    """`alignment.rewards.switch_threshold` on the sigmoid scores of every test answer with a gold safety label
    (rows with both `chosen_safe` and `rejected_safe`, over all test sets); None where there is none. The
    result names the test sets it read."""
    safety, unsafe, used = [], [], []
    for name, rows in test_sets.items():
        labelled = [i for i, r in enumerate(rows) if "chosen_safe" in r and "rejected_safe" in r]
        if not labelled:
            continue
        chosen, rejected = scores[name]
        safety += [torch.sigmoid(chosen[labelled].double()), torch.sigmoid(rejected[labelled].double())]
        unsafe += [torch.tensor([not rows[i]["chosen_safe"] for i in labelled]),
                   torch.tensor([not rows[i]["rejected_safe"] for i in labelled])]
        used.append(name)
    if not used:
        return None
    return {**switch_threshold(torch.cat(safety), torch.cat(unsafe), precision), "test_sets": used}


def plot_score_histograms(scores: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path) -> None:
    """One panel per test set: histograms of the chosen and the rejected answers' raw scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(5 * len(scores), 3.5), squeeze=False)
    for ax, (name, (chosen, rejected)) in zip(axes[0], scores.items()):
        ax.hist(chosen.numpy(), bins=40, alpha=0.6, label="chosen")
        ax.hist(rejected.numpy(), bins=40, alpha=0.6, label="rejected")
        ax.set_title(f"{name} test")
        ax.set_xlabel("reward score")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_accuracy_table(result: dict, title: str = "test set") -> str:
    """Markdown table, one row per entry of `result` ({name: preference_metrics}), one column per rating
    bucket plus the average (Tables 7/8)."""
    head = [title, *RATINGS, "avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in result.items():
        cells = [_pct(entry["by_rating"][r]["accuracy"]) for r in RATINGS] + [_pct(entry["accuracy"])]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


# ----------------------------------------------------------------------------------------- the stage
def load_rm_data(cfg: RMConfig) -> tuple[list[dict], list[dict], dict[str, list[dict]]]:
    """Every input file validated (file:row errors) before anything is written: primary, secondary, tests."""
    return load_preference_data(cfg.data)


def run_rm(cfg: RMConfig) -> dict:
    """`align rm`: validate data, mix, train (resuming from checkpoints), evaluate, mark done; or, with
    `ablation.margin_scales`, one such run per margin scale and their comparison."""
    if cfg.ablation.margin_scales:
        return run_margin_ablation(cfg)
    if cfg.train.packing:
        raise ValueError("train.packing must be false for reward models: each example is a chosen/rejected pair")
    run = RunDir(cfg.output.dir, cfg, overwrite=cfg.output.overwrite)
    done = run.finished_summary("rm")
    if done is not None:
        return done
    check_model_paths(model_paths(cfg.model))  # a missing model stops the run before any data is read
    primary, secondary, tests = load_rm_data(cfg)
    pairs, mix = mix_rm_data(cfg, primary, secondary, tests)
    inputs = source_hashes([*cfg.data.primary, *cfg.data.secondary, *(s for v in cfg.data.test.values() for s in v)])
    summary = train_reward_model(cfg, pairs, run, inputs, mix)
    if is_main_process():
        summary["eval"], switch = evaluate_reward_model(
            run.final_dir, tests, batch_size=cfg.eval.batch_size, max_length=cfg.train.max_length,
            bins=cfg.eval.calibration_bins, plot_path=run.path / "scores.png" if cfg.eval.histogram else None,
            attn_implementation=cfg.model.attn_implementation, switch_precision=cfg.eval.switch_precision)
        write_json_atomic(run.path / "eval.json", summary["eval"])
        if switch is not None:  # beside the model, where `reward.safety_threshold: calibrated` reads it
            add_json_to_committed(run.final_dir, SAFETY_SWITCH_FILE, switch)
            summary["safety_switch"] = switch
        run.mark_done(summary)
        print_rm_eval(summary["eval"])
        if switch is not None:
            print(f"[rm] safety switch at precision >= {switch['target_precision']:.2f}: {switch_text(switch)} "
                  "(paper: 0.15, precision 0.89, recall 0.55)")
    return summary


def train_reward_model(cfg: RMConfig, pairs: list[dict], run: RunDir, inputs: dict[str, str], mix: dict) -> dict:
    """Train a scalar-head RM from `cfg.model` on `pairs` into `run` with the shared loop."""
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.chat.template)
    warning = toy_tokenizer_warning(tokenizer, [r[side] for r in pairs[:500] for side in ("chosen", "rejected")])
    if warning and is_main_process():
        print(f"[rm] {warning}")
    examples, truncation = encode_and_count_pairs(tokenizer, pairs, cfg.train.max_length, cfg.margin_scale)
    plan = None if cfg.probe.enabled else make_plan(cfg, examples, world_size())  # the probe takes no steps
    run.prepare(inputs, is_main=is_main_process())
    if is_main_process():
        if truncation["truncated"]:
            print(format_truncation("rm pairs", truncation, side="left"))
        write_json_atomic(run.path / "mix.json", mix)
        c = mix["counts"]
        print(f"[rm] {len(pairs)} pairs: {c['primary']} primary + {c['secondary_drawn']} of "
              f"{c['secondary_available']} secondary ({mix['kind']}); margin {cfg.margin_scale}; "
              + ("a linear probe (features, then the head by L-BFGS)" if plan is None else f"{len(plan.steps)} steps"))
        if mix["dedup_test_prompts"] is not None:
            d = mix["dedup_test_prompts"]
            print(f"[rm] dropped {d['primary']['removed']} primary and {d['secondary']['removed']} secondary pairs "
                  "whose prompt is in a test set")
    torch.manual_seed(cfg.seed)  # the new scalar head's initialisation is part of the run's seed
    # a probe (frozen features on the main process) is never partitioned
    with zero3_init(cfg.distributed, cfg.train, cfg.optim, cfg.model.lora.enabled or cfg.probe.enabled) as partitioned:
        model = load_reward_model(cfg.model, tokenizer.pad_token_id)
    if partitioned and is_main_process():
        print(f"[rm] loaded partitioned with ZeRO-3 (deepspeed.zero.Init): {weight_share(model):.0%} of the weights "
              "on this process")
    if cfg.probe.enabled:
        summary = probe_reward_model(cfg, model, tokenizer, examples, run)
    else:
        step = rm_step_fn(examples, tokenizer.pad_token_id, cfg.model.attn_implementation)
        summary = train(model=model, tokenizer=tokenizer, plan=plan, step_fn=step, cfg=loop_config(cfg), run=run,
                        desc=f"rm[{cfg.margin_scale}]", unit="pairs")
    summary.update(pairs=len(pairs), margin_scale=cfg.margin_scale, truncation=truncation)
    return summary


# ----------------------------------------------------------------------------------------- linear probe
@torch.no_grad()
def pair_features(model, examples: list[dict], pad_id: int, *, batch_size: int, attn_implementation: str = "sdpa",
                  desc: str = "rm-probe") -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [N, hidden], rejected [N, hidden]): what the scalar head reads for each pair's two answers
    (`alignment.scoring.packed_features`), in float32, `batch_size` answers per packed forward by length."""
    from tqdm.auto import tqdm

    seqs = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    was_training = model.training
    model.eval()
    out = None
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", dynamic_ncols=True):
        idx = order[start:start + batch_size]
        feats = packed_features(model, [seqs[i] for i in idx], pad_id, attn_implementation).float().cpu()
        if out is None:
            out = torch.empty(len(seqs), feats.shape[1])
        out[idx] = feats
    model.train(was_training)
    n = len(examples)
    return out[:n], out[n:]


def fit_ranking_probe(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, *, l2: float,
                      max_iter: int, log=None) -> tuple[torch.Tensor, dict]:
    """The linear head w [hidden] (score = w . h) minimising the paper's ranking loss on fixed features,
    -mean_i log sigmoid(w . (c_i - r_i) - m_i) + l2/2 |w * sd|^2 (`alignment.losses.ranking_loss`), where sd
    is each feature's standard deviation over all 2N answers, subject to w . mean(h) = 0.

    The fit runs on standardised features z = h / sd with u = w * sd, by full-batch L-BFGS in float64 (the loss
    is convex and the constraint linear: the same data give the same head). The constraint sets the scores'
    level, which pairs alone leave free: the average training answer scores 0 (sigmoid 0.5). A Llama scalar
    head has no bias, and the combined reward's safety switch reads the safety score's level (a probe fit
    without it scored every answer ~0.9, so the switch never fired). u is kept orthogonal to the mean
    standardised feature by optimising v and projecting, u = v - (v . e) e.
    `log(iteration, loss)` after each iteration. Returns (w, {"loss", "accuracy", "iterations"}), accuracy on
    the training pairs."""
    c, r, m = chosen.double(), rejected.double(), margin.double()
    both = torch.cat([c, r])
    sd = both.std(dim=0).clamp_min(1e-6)
    z = (c - r) / sd
    e = both.mean(dim=0) / sd
    e = e / e.norm().clamp_min(1e-12)
    v = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v], lr=1.0, max_iter=1, line_search_fn="strong_wolfe")

    def head() -> torch.Tensor:
        return v - (v @ e) * e

    def objective() -> torch.Tensor:
        opt.zero_grad()
        u = head()
        loss = torch.nn.functional.softplus(-(z @ u - m)).mean() + l2 / 2 * (u @ u)
        loss.backward()
        return loss

    previous, iterations = float("inf"), 0
    for iterations in range(1, max_iter + 1):  # one L-BFGS iteration per call; its history carries over
        loss = opt.step(objective).item()
        if log is not None:
            log(iterations, loss)
        if abs(previous - loss) <= 1e-10 * max(1.0, abs(loss)):
            break
        previous = loss
    w = head().detach() / sd
    accuracy = ((c - r) @ w > 0).double().mean().item()
    return w.float(), {"loss": float(objective().detach()), "accuracy": accuracy, "iterations": iterations}


def choose_probe_l2(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, grid: list[float], *,
                    folds: int, seed: int, max_iter: int) -> tuple[float, dict[str, float]]:
    """The penalty of `grid` whose probe ranks held-out folds best: the pairs in a seeded random order are cut
    into `folds` folds; each fold is scored by the head `fit_ranking_probe` fits on the others (accuracy:
    chosen scored above rejected). Returns (best l2, {str(l2): mean accuracy over the folds}); a tie goes to
    the larger penalty (the smoother head). A one-value grid is returned as is, with no folds run."""
    if len(grid) == 1:
        return grid[0], {}
    order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed))
    parts = [order[k::folds] for k in range(folds)]
    table = {}
    for l2 in grid:
        right = 0
        for held in parts:
            keep = torch.ones(len(chosen), dtype=torch.bool)
            keep[held] = False
            w, _ = fit_ranking_probe(chosen[keep], rejected[keep], margin[keep], l2=l2, max_iter=max_iter)
            right += int(((chosen[held] - rejected[held]) @ w > 0).sum())
        table[str(l2)] = right / len(chosen)
    best = max(grid, key=lambda l2: (table[str(l2)], l2))
    return best, table


def set_scalar_head(model, weight: torch.Tensor) -> None:
    """Write the probe's w into the model's scalar head ("score", Linear(hidden, 1)); a bias, where the
    head has one, is zeroed (a constant shifts every score alike and leaves each pair's order)."""
    head = model.score
    with torch.no_grad():
        head.weight.copy_(weight.view_as(head.weight).to(head.weight.dtype))
        if head.bias is not None:
            head.bias.zero_()


def probe_reward_model(cfg: RMConfig, model, tokenizer, examples: list[dict], run: RunDir) -> dict:
    """`probe.enabled`: features of every pair from the frozen model (cached as `probe_features.pt`, so a
    killed run resumes after them), the head fit by `fit_ranking_probe`, the model saved to final/. The main
    process does the work (one forward pass over the data); other processes wait for final/."""
    features = run.path / "probe_features.pt"
    desc = f"rm-probe[{cfg.margin_scale}]"
    summary: dict = {}

    def work() -> None:
        t0 = time.perf_counter()
        cached = torch.load(features) if features.is_file() else None
        if cached is not None and cached.get("config_hash") == run.hash and len(cached["chosen"]) == len(examples):
            chosen, rejected = cached["chosen"], cached["rejected"]
            print(f"[{desc}] features of {len(examples)} pairs read from {features}")
        else:
            print(f"[{desc}] features of {len(examples)} pairs from the frozen model (one forward pass)")
            chosen, rejected = pair_features(model, examples, tokenizer.pad_token_id, batch_size=cfg.probe.batch_size,
                                             attn_implementation=cfg.model.attn_implementation, desc=desc)
            tmp = features.with_suffix(".tmp")
            torch.save({"chosen": chosen, "rejected": rejected, "config_hash": run.hash}, tmp)
            tmp.replace(features)
            fault_point("rm.probe_features")
        seconds_features = time.perf_counter() - t0
        margin = torch.tensor([e["margin"] for e in examples])
        p = cfg.probe
        l2, cv = choose_probe_l2(chosen, rejected, margin, p.l2, folds=p.cv_folds, seed=cfg.seed, max_iter=p.max_iter)
        if cv:
            print(f"[{desc}] l2 by {p.cv_folds}-fold cross-validated accuracy: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in cv.items()) + f"; chosen {l2}")
        log = MetricsLog(run.path, cfg.logging.tensorboard, resume_step=0, wandb=cfg.logging.wandb, name=desc)
        weight, fit = fit_ranking_probe(chosen, rejected, margin, l2=l2, max_iter=p.max_iter,
                                        log=lambda it, loss: log.log({"step": it, "loss": loss}))
        log.close()
        set_scalar_head(model, weight)
        save_pretrained_atomic(run.final_dir, model, tokenizer)
        elapsed = time.perf_counter() - t0
        print(f"[{desc}] head fit in {fit['iterations']} L-BFGS iterations: loss {fit['loss']:.4f}, training "
              f"accuracy {fit['accuracy']:.3f}")
        summary.update(steps=fit["iterations"], resumed_from=0, final={"loss": fit["loss"], "accuracy": fit["accuracy"]},
                       probe={**fit, "features_seconds": seconds_features, "l2": l2, "cv_accuracy": cv},
                       pairs_per_s=len(examples) / max(elapsed, 1e-9), seconds=elapsed)

    main_process_does(work, lambda: (run.final_dir / COMPLETE_MARK).is_file(), "the probe's final model", desc)
    return summary


def print_rm_eval(result: dict) -> None:
    print("[rm] accuracy (%) by rating bucket")
    print(format_accuracy_table(result))
    for name, entry in result.items():
        if "by_category" in entry:
            cats = ", ".join(f"{k} {_pct(v['accuracy'])} (n={v['count']})" for k, v in entry["by_category"].items())
            print(f"[rm] {name}: accuracy by safety category: {cats}")
        cal = entry["calibration"]
        ece = "-" if cal["ece"] is None else f"{cal['ece']:.3f}"
        print(f"[rm] {name}: ECE {ece}; mean sigmoid score chosen {_fmt(entry['sigmoid_mean']['chosen'])}, "
              f"rejected {_fmt(entry['sigmoid_mean']['rejected'])}")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


# ----------------------------------------------------------------------------------------- margin ablation
def run_margin_ablation(cfg: RMConfig) -> dict:
    """One RM per margin scale on the same data and seed, each in `<output.dir>/margin-<scale>` (resumable,
    finished ones are skipped), then `ablation.json` and `ablation.md`: accuracy per rating bucket for
    each margin and test set (Table 28)."""
    load_rm_data(cfg)  # fail on bad data before any sub-run directory is written
    out = Path(cfg.output.dir)
    results = {}
    for scale in cfg.ablation.margin_scales:
        sub = dataclasses.replace(cfg, margin_scale=scale, ablation=dataclasses.replace(cfg.ablation, margin_scales=[]),
                                  output=dataclasses.replace(cfg.output, dir=str(out / f"margin-{scale}")))
        results[scale] = run_rm(sub)
    if not is_main_process():
        return {}
    table = {scale: summary["eval"] for scale, summary in results.items()}
    write_json_atomic(out / "ablation.json", table)
    text = format_ablation_table(table)
    (out / "ablation.md").write_text(text + "\n")
    print(text)
    return {"ablation": table}


def format_ablation_table(table: dict[str, dict]) -> str:
    """Markdown: per test set, one row per margin scale, accuracy per rating bucket and average."""
    tests = list(next(iter(table.values()))) if table else []
    parts = []
    for test in tests:
        parts.append(f"### {test} test: accuracy (%) by rating bucket and margin\n")
        parts.append(format_accuracy_table({f"margin {s}": r[test] for s, r in table.items()}, title="margin"))
        parts.append("")
    return "\n".join(parts).rstrip()
