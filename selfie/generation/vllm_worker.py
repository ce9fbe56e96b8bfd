"""The vLLM side of `generate.backend: vllm`, run as a script by the interpreter of vLLM's own environment.

It imports only the standard library and vLLM (vLLM pins other transformers versions than selfie), reads one
request (a JSON file: the model, the adapter, the engine's sizes, the sampling, and every (prompt, k) with its
token ids and seed), and writes JSON lines to the file descriptor it is given: `ready` once the engine is up,
one line per prompt as soon as its K responses are done (token ids and finish reasons, in completion order),
`done` at the end, or one `error` line. selfie/generation/vllm_backend.py starts it and writes the rows.

One request per (prompt, k) with n=1 and that response's own seed: vLLM gives every request its own random
stream, so a response does not depend on which others share its batch (n=K would derive the seeds itself).
"""

import json
import os
import sys
import time
import traceback


def emit(out, **line) -> None:
    out.write(json.dumps(line) + "\n")
    out.flush()


def build_engine(request: dict):
    from vllm import LLM

    engine = request["engine"]
    memory = (
        {"kv_cache_memory_bytes": engine["kv_cache_bytes"]}
        if engine.get("kv_cache_bytes")
        else {"gpu_memory_utilization": engine["gpu_memory_utilization"]}
    )
    lora = {"enable_lora": True, "max_lora_rank": engine["max_lora_rank"], "max_loras": 1} if request["adapter"] else {}
    return LLM(
        model=request["model"],
        dtype=engine["dtype"],
        skip_tokenizer_init=True,  # token ids in, token ids out: selfie's chat encoding and stop ids
        max_model_len=engine["max_model_len"],
        **({"max_num_seqs": engine["max_num_seqs"]} if engine["max_num_seqs"] else {}),  # None: vLLM's default
        enforce_eager=engine["enforce_eager"],
        seed=0,  # every request carries its own seed; this one seeds nothing selfie samples with
        **request["model_options"],  # revision, trust_remote_code
        **memory,
        **lora,
    )


def lora_request(request: dict):
    from vllm.lora.request import LoRARequest

    return LoRARequest("adapter", 1, request["adapter"]) if request["adapter"] else None


def run(request: dict, out) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    start = time.perf_counter()
    llm = build_engine(request)
    adapter = lora_request(request)
    if adapter is not None:
        try:
            llm.llm_engine.add_lora(adapter)
        except Exception as e:  # noqa: BLE001 - the parent merges the adapter instead and says so
            emit(out, event="error", kind="adapter", message=first_line(e))
            return
    import vllm

    s, engine = request["sampling"], llm.llm_engine
    sequences = engine.vllm_config.scheduler_config.max_num_seqs  # the recipe's, or vLLM's default
    emit(out, event="ready", vllm=vllm.__version__, startup_seconds=round(time.perf_counter() - start, 3), max_num_seqs=sequences)

    prompts = request["prompts"]
    pending = [(p, k) for p in range(len(prompts)) for k in range(len(prompts[p]["seeds"]))]
    window = 4 * sequences  # requests queued at once: the scheduler stays full, memory bounded
    results: dict[int, dict[int, list]] = {}
    added = 0
    while added < len(pending) or engine.has_unfinished_requests():
        while added < len(pending) and engine.get_num_unfinished_requests() < window:
            p, k = pending[added]
            params = SamplingParams(
                n=1,
                seed=prompts[p]["seeds"][k],
                temperature=s["temperature"],
                top_p=s["top_p"],
                max_tokens=s["max_tokens"],
                stop_token_ids=s["stop_ids"],
                detokenize=False,
            )
            params.output_kind = RequestOutputKind.FINAL_ONLY
            engine.add_request(f"{p}:{k}", TokensPrompt(prompt_token_ids=prompts[p]["ids"]), params, lora_request=adapter)
            added += 1
        for output in engine.step():
            if not output.finished:
                continue
            p, k = map(int, output.request_id.split(":"))
            completion = output.outputs[0]
            results.setdefault(p, {})[k] = [list(completion.token_ids), completion.finish_reason]
            if len(results[p]) == len(prompts[p]["seeds"]):
                emit(out, key=prompts[p]["key"], outputs=[results[p][i] for i in range(len(results[p]))])
                del results[p]
    emit(out, event="done")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def main() -> None:
    request_path, fd = sys.argv[1], int(sys.argv[2])
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        try:
            run(request, out)
        except Exception as e:  # noqa: BLE001 - one line for the parent; the traceback is in the worker's log
            traceback.print_exc()
            emit(out, event="error", kind="engine", message=first_line(e))
            sys.exit(1)


if __name__ == "__main__":  # the engine may spawn processes that import this file: nothing runs on import
    main()
