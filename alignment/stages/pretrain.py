"""Stage 0: the tiny base model. Trains a BPE tokenizer on the toy corpus and a tiny `LlamaForCausalLM`
from scratch on it (next-token loss on every token), so SFT starts from a language model, not from noise.
Real models skip this stage: their recipes point `model.path` at Llama-2 weights."""
from __future__ import annotations


from alignment.chat import IGNORE_INDEX
from alignment.config import PretrainConfig
from alignment.data.sources import load_sources, source_hashes
from alignment.distributed import is_main_process
from alignment.finetune import lm_step_fn, loop_config, make_plan
from alignment.judging import heldout_loss
from alignment.models.tiny import build_tiny_llama
from alignment.models.tokenizer import load_tokenizer, train_tokenizer
from alignment.runs import RunDir
from alignment.training import train


def encode_documents(tokenizer, texts: list[str], max_length: int) -> list[dict]:
    """BOS + text + EOS, cut into pieces of at most `max_length`; every token but BOS is a target."""
    examples = []
    for text in texts:
        # split_special_tokens: a document that contains "</s>" gets those characters, not an EOS id
        body = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
        for start in range(0, len(ids), max_length):
            piece = ids[start:start + max_length]
            if len(piece) > 1:
                examples.append({"input_ids": piece, "labels": [IGNORE_INDEX, *piece[1:]]})
    return examples


def run_pretrain(cfg: PretrainConfig) -> dict:
    run = RunDir(cfg.output.dir, cfg, overwrite=cfg.output.overwrite)
    done = run.finished_summary("pretrain")
    if done is not None:
        return done
    texts = [r["text"] for r in load_sources(cfg.data.corpus, "text_document")]
    run.prepare(source_hashes(cfg.data.corpus), is_main=is_main_process())
    tok_dir = run.path / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(texts, cfg.model.vocab_size, tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    n_eval = int(len(texts) * cfg.data.eval_fraction)
    examples = encode_documents(tokenizer, texts[n_eval:], cfg.train.max_length)
    eval_examples = encode_documents(tokenizer, texts[:n_eval], cfg.train.max_length)
    model = build_tiny_llama(tokenizer, cfg.model.size, seed=cfg.seed)
    plan = make_plan(cfg, examples, world=1)
    step = lm_step_fn(examples, tokenizer.pad_token_id, "sdpa", cfg.train.answer_only_loss)
    summary = train(model=model, tokenizer=tokenizer, plan=plan, step_fn=step,
                    cfg=loop_config(cfg), run=run, desc="pretrain", unit="tok")
    if is_main_process():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(run.final_dir, local_files_only=True)
        summary["heldout_loss"] = heldout_loss(model, eval_examples, tokenizer.pad_token_id, "sdpa")
        summary["parameters"] = sum(p.numel() for p in model.parameters())
        run.mark_done(summary)
        print(f"[pretrain] {summary['parameters'] / 1e6:.2f}M parameters, held-out loss {summary['heldout_loss']:.3f}")
    return summary
