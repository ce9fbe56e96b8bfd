"""How far AlignEZ and RAHF move the model's own preference, and what each edit costs.

On the built-in smollm2-135m: self-generated AlignEZ pairs (helpful / harmful) on held-out demo
prompts are scored by the log-prob margin logp(y+|x) - logp(y-|x) (summed response-token
log-probs); the accuracy is the share of pairs where the margin is positive. Measured before any
edit, after AlignEZ (folded model) and after RAHF (merged model), each built with
`build_edited_model` from prompts disjoint from the held-out ones. Results go to docs/EDITING.md
(between the bench markers) and docs/bench/edit.json.

    python -m scripts.benchmarks.edit [--quick]

Full sizes take about 12 minutes on 2 quiet CPU cores (RAHF's 150 steps are 3 of them); --quick about 1 minute
and writes nothing. On a busy machine set OMP_NUM_THREADS=1: oversubscribed torch threads are many times slower.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import torch

from selfie.config.loader import load_init
from selfie.config.schema import AlignEZConfig, RAHFConfig
from selfie.data import load_prompts
from selfie.edit import build_edited_model
from selfie.edit.alignez_data import generate_alignez_data
from selfie.edit.preference import pair_margins
from selfie.io import atomic_write_jsonl
from selfie.models import load_model, load_tokenizer

from scripts.benchlib import machine, save_raw, write_marked


def preference(model_dir: str, pairs: list[dict]) -> dict:
    margin = pair_margins(load_model(model_dir, "float32").eval(), load_tokenizer(model_dir), pairs)
    return {
        "accuracy": float((margin > 0).double().mean()),
        "mean_margin": float(margin.mean()),
        "margins": [round(m, 3) for m in margin.tolist()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sizes = (
        {"fit": 4, "held_out": 4, "char": 8, "resp": 16, "steps": 3}
        if args.quick
        else {"fit": 24, "held_out": 24, "char": 40, "resp": 80, "steps": RAHFConfig.steps}
    )
    common = {"num_prompts": sizes["fit"], "max_new_tokens_resp": sizes["resp"], "batch_size": 8, "dtype": "float32"}
    inits = {
        "alignez": {"method": "alignez", **common, "max_new_tokens_char": sizes["char"]},
        "rahf": {"method": "rahf", **common, "steps": sizes["steps"]},
    }

    rows = load_prompts("demo")
    random.Random(args.seed).shuffle(rows)
    fit_rows, held_rows = rows[: sizes["fit"]], rows[sizes["fit"] : sizes["fit"] + sizes["held_out"]]
    results: dict = {"machine": machine(), "threads": torch.get_num_threads(), "sizes": sizes, "inits": inits}
    with tempfile.TemporaryDirectory(prefix="bench-edit-") as tmp:
        tmp = Path(tmp)
        atomic_write_jsonl(tmp / "fit_prompts.jsonl", fit_rows)
        start = time.perf_counter()
        tokenizer, model = load_tokenizer(args.model), load_model(args.model, "float32").eval()
        results["model"] = {"name": args.model, "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size}
        held = generate_alignez_data(
            model,
            tokenizer,
            held_rows,
            [["helpful", "harmful"]],
            max_new_tokens_char=sizes["char"],
            max_new_tokens_resp=sizes["resp"],
            temperature=AlignEZConfig.temperature,
            seed=args.seed + 1000,
            batch_size=8,
        )
        del model
        results["held_out_pairs"] = len(held.pairs)
        results["held_out_data_seconds"] = round(time.perf_counter() - start, 1)
        results["base"] = preference(args.model, held.pairs)
        for method, init in inits.items():
            start = time.perf_counter()
            out = build_edited_model(
                load_init({**init, "prompts": str(tmp / "fit_prompts.jsonl")}), args.model, tmp / method, args.seed
            )
            seconds = time.perf_counter() - start
            built = json.loads((out / "selfie_edit.json").read_text())["result"]
            results[method] = {**preference(str(out), held.pairs), "build_seconds": round(seconds, 1), "build": built}
    if not args.quick:
        save_raw("edit", results)
        write_marked("EDITING.md", "bench_edit", report(results))
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
        lines.append(
            f"| {method} | {m['accuracy']:.3f} | {m['mean_margin']:.2f} | {sec['data']} + {sec['edit']}, {m['build_seconds']} |"
        )
    a, h = r["alignez"]["build"], r["rahf"]["build"]
    lines += [
        "",
        f"AlignEZ: {a['pairs']} self-generated pairs, layers {a['layers']} (MLP output), alpha {a['alpha']}, "
        f"rule per layer {a['rule']}, cosine(u+, u-) there {[a['cosine_plus_minus'][i] for i in a['layers']]}; its own "
        f"held-out margin {a['held_out_margin']['unedited']} -> {a['held_out_margin']['edited']}. RAHF: target layers "
        f"{h['target_layers']}, held-out representation loss {h['held_out_loss']['before']} -> "
        f"{h['held_out_loss']['after']}, training loss by tenths {h['loss_curve']}. Held-out data generation took "
        f"{r['held_out_data_seconds']} s (not part of either edit).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
