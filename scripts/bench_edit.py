"""How far AlignEZ and RAHF move the model's own preference, and what each edit costs.

On the built-in smollm2-135m: self-generated AlignEZ pairs (helpful / harmful) on held-out demo
prompts are scored by the log-prob margin logp(y+|x) - logp(y-|x) (summed response-token
log-probs); the accuracy is the share of pairs where the margin is positive. Measured before any
edit, after AlignEZ (folded model) and after RAHF (merged model), each built with
`build_edited_model` from prompts disjoint from the held-out ones. Results go to docs/EDITING.md
(between the bench markers) and docs/bench/edit.json.

    python scripts/bench_edit.py [--quick]

Full sizes take about 5 minutes on 2 quiet CPU cores (about 7 with 1 thread); --quick about 1 minute
and writes nothing. On a busy machine set OMP_NUM_THREADS=1: oversubscribed torch threads are many times slower.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selfie.config import AlignEZConfig, load_init  # noqa: E402
from selfie.data import load_prompts  # noqa: E402
from selfie.edit import build_edited_model  # noqa: E402
from selfie.edit.alignez_data import generate_alignez_data  # noqa: E402
from selfie.edit.hidden import encode, pad_batch  # noqa: E402
from selfie.io import atomic_write_jsonl, atomic_write_text  # noqa: E402
from selfie.models import load_model, load_tokenizer  # noqa: E402

from benchlib import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "EDITING.md"
BEGIN, END = "<!-- bench_edit:begin -->", "<!-- bench_edit:end -->"


@torch.no_grad()
def response_logps(model, tokenizer, prompts: list[list[dict]], responses: list[str], batch_size: int = 8) -> torch.Tensor:
    """Summed log-prob of each response's tokens (as generated, no end-of-turn token) after its prompt."""
    items = [encode(tokenizer, p, y) for p, y in zip(prompts, responses)]
    out = torch.zeros(len(items), dtype=torch.float64)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = pad_batch(chunk, tokenizer.pad_token_id, "right")
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
        rows, cols = batch.response_index(chunk)
        token_logps = logits[rows, cols - 1].float().log_softmax(-1).gather(1, batch.input_ids[rows, cols][:, None])[:, 0]
        out[start:start + len(chunk)] = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, rows, token_logps.double())
    return out


def preference(model_dir: str, pairs: list[dict]) -> dict:
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir, "float32").eval()
    prompts = [p["prompt"] for p in pairs]
    chosen = response_logps(model, tokenizer, prompts, [p["chosen"][0]["content"] for p in pairs])
    rejected = response_logps(model, tokenizer, prompts, [p["rejected"][0]["content"] for p in pairs])
    margin = chosen - rejected
    return {"accuracy": float((margin > 0).double().mean()), "mean_margin": float(margin.mean()),
            "margins": [round(m, 3) for m in margin.tolist()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sizes = ({"fit": 4, "held_out": 4, "char": 8, "resp": 16, "steps": 3} if args.quick else
             {"fit": 24, "held_out": 24, "char": 40, "resp": 80, "steps": 40})
    common = {"num_prompts": sizes["fit"], "max_new_tokens_resp": sizes["resp"], "batch_size": 8, "dtype": "float32"}
    inits = {
        "alignez": {"method": "alignez", **common, "max_new_tokens_char": sizes["char"]},
        "rahf": {"method": "rahf", **common, "steps": sizes["steps"]},
    }

    rows = load_prompts("demo")
    random.Random(args.seed).shuffle(rows)
    fit_rows, held_rows = rows[:sizes["fit"]], rows[sizes["fit"]:sizes["fit"] + sizes["held_out"]]
    results: dict = {"machine": machine(), "threads": torch.get_num_threads(), "sizes": sizes, "inits": inits}
    with tempfile.TemporaryDirectory(prefix="bench-edit-") as tmp:
        tmp = Path(tmp)
        atomic_write_jsonl(tmp / "fit_prompts.jsonl", fit_rows)
        start = time.perf_counter()
        tokenizer, model = load_tokenizer(args.model), load_model(args.model, "float32").eval()
        results["model"] = {"name": args.model, "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size}
        held = generate_alignez_data(model, tokenizer, held_rows, [["helpful", "harmful"]], max_new_tokens_char=sizes["char"],
                                     max_new_tokens_resp=sizes["resp"], temperature=AlignEZConfig.temperature,
                                     seed=args.seed + 1000, batch_size=8)
        del model
        results["held_out_pairs"] = len(held.pairs)
        results["held_out_data_seconds"] = round(time.perf_counter() - start, 1)
        results["base"] = preference(args.model, held.pairs)
        for method, init in inits.items():
            start = time.perf_counter()
            out = build_edited_model(load_init({**init, "prompts": str(tmp / "fit_prompts.jsonl")}), args.model, tmp / method, args.seed)
            seconds = time.perf_counter() - start
            built = json.loads((out / "selfie_edit.json").read_text())["result"]
            results[method] = {**preference(str(out), held.pairs), "build_seconds": round(seconds, 1), "build": built}
    (ROOT / "docs" / "bench").mkdir(parents=True, exist_ok=True)
    if not args.quick:
        atomic_write_text(ROOT / "docs" / "bench" / "edit.json", json.dumps(results, indent=2) + "\n")
        write_doc(results)
    print(report(results))


def report(r: dict) -> str:
    s = r["sizes"]
    lines = [
        f"Machine: {r['machine']}, {r['threads']} torch threads, float32. Model: {r['model']['name']} "
        f"({r['model']['layers']} layers, hidden {r['model']['hidden']}).",
        f"Sizes: {s['fit']} prompts to build each edit, {s['held_out']} held-out prompts -> {r['held_out_pairs']} held-out "
        f"self-generated pairs; characteristics {s['char']} tokens, responses {s['resp']} tokens; RAHF {s['steps']} steps "
        "of 4 examples. Demo prompts, seeded shuffle, the two sets disjoint.",
        "",
        "| model | held-out accuracy of logp(y+) > logp(y-) | mean margin (nats) | build time (s): data + edit, total |",
        "|---|---|---|---|",
        f"| base (no edit) | {r['base']['accuracy']:.3f} | {r['base']['mean_margin']:.2f} | - |",
    ]
    for method in ("alignez", "rahf"):
        m = r[method]
        sec = m["build"]["seconds"]
        lines.append(f"| {method} | {m['accuracy']:.3f} | {m['mean_margin']:.2f} | {sec['data']} + {sec['edit']}, "
                     f"{m['build_seconds']} |")
    a, h = r["alignez"]["build"], r["rahf"]["build"]
    lines += ["", f"AlignEZ: {a['pairs']} self-generated pairs, layers {a['layers']} (MLP output) chosen by held-out pair "
              f"accuracy {[a['layer_scores'][i] for i in a['layers']]}; cosine(u+, u-) before orthogonalising "
              f"{a['cosine_plus_minus']}. RAHF: target layers {h['target_layers']}, loss {h['loss_first']:.3f} -> "
              f"{h['loss_last']:.3f} over {s['steps']} steps. Held-out data generation took {r['held_out_data_seconds']} s "
              "(not part of either edit)."]
    return "\n".join(lines)


def write_doc(results: dict) -> None:
    text = DOC.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{report(results)}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    atomic_write_text(DOC, pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n")


if __name__ == "__main__":
    main()
