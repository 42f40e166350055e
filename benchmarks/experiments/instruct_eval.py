"""Before/after table of instruction tuning on held-out prompts of the bundled instruction set.

    nima-edge data instructions --corpus data.txt --out data/instruct
    nima-edge finetune runs/nima-1m --data data/instruct/instruct.jsonl --recipe instruct --out runs/nima-1m-instruct
    python benchmarks/experiments/instruct_eval.py --before runs/nima-1m --after runs/nima-1m-instruct \
        --data data/instruct/instruct-val.jsonl --out runs/instruct-eval

instruct-val.jsonl comes from the validation part of the corpus, so neither pretraining nor the
fine-tune saw its texts. Per model and kind of task: the loss per assistant token (the fine-tune's own
objective) and, from greedy replies to the rendered prompt (stopped at the end-of-turn token, at
most 64 tokens): "who" exact match of the speaker's name, chrF of the reply for "continue" and
"persona" (sacrebleu, 0-100).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import sacrebleu
import torch

from nima_edge import chat_data
from nima_edge.atomic import write_text
from nima_edge.chat import render
from nima_edge.runtimes.torch_reference import TorchRuntime
from nima_edge.train.finetune import evaluate_rows

MAX_NEW = 64


def reply(rt: TorchRuntime, messages: list[dict]) -> str:
    ids = rt.tokenize(render(messages, add_generation_prompt=True), add_bos=False)[-(rt.context_length - MAX_NEW):]
    return rt.detokenize(list(rt.generate_ids(ids, MAX_NEW))).strip()


def measure(ckpt: Path, convs: list[dict], limit: int) -> dict:
    rt = TorchRuntime(ckpt)
    out = {}
    for kind in ("who", "continue", "persona"):
        mine = [c["messages"] for c in convs if c.get("kind") == kind][:limit]
        if not mine:
            continue
        rows = chat_data.pack(mine, rt.tokenizer, rt.context_length)
        loss = evaluate_rows(rt.model, rows)["loss"]
        answers = [reply(rt, m[:-1]) for m in mine]
        refs = [m[-1]["content"] for m in mine]
        r = {"conversations": len(mine), "assistant_loss": loss}
        if kind == "who":
            r["exact_match"] = sum(a == b for a, b in zip(answers, refs)) / len(mine)
        else:
            r["chrf"] = sacrebleu.corpus_chrf(answers, [refs]).score
        r["examples"] = [{"prompt": m[-2]["content"][:80], "reference": b, "answer": a}
                         for m, a, b in list(zip(mine, answers, refs))[:3]]
        out[kind] = r
    return out


def markdown(before: dict, after: dict) -> str:
    lines = ["| task | held-out prompts | assistant loss before | after | reply score before | after |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for kind, b in before.items():
        a = after[kind]
        metric = "exact_match" if kind == "who" else "chrf"
        fmt = (lambda v: f"{100 * v:.0f}% exact") if kind == "who" else (lambda v: f"chrF {v:.1f}")
        lines.append(f"| {kind} | {b['conversations']} | {b['assistant_loss']:.3f} | {a['assistant_loss']:.3f} | "
                     f"{fmt(b[metric])} | {fmt(a[metric])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="the checkpoint before fine-tuning")
    ap.add_argument("--after", type=Path, required=True, help="the fine-tuned (merged) checkpoint")
    ap.add_argument("--data", type=Path, required=True, help="held-out chat JSONL (instruct-val.jsonl)")
    ap.add_argument("--limit", type=int, default=60, help="prompts per task kind")
    ap.add_argument("--out", type=Path, help="write table.md and table.json here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    convs = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    result = {"before": measure(args.before, convs, args.limit), "after": measure(args.after, convs, args.limit)}
    table = markdown(result["before"], result["after"])
    print(table)
    if args.out:
        write_text(args.out / "table.md", table)
        write_text(args.out / "table.json", json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
