"""Judges served over HTTP, against vLLM's real OpenAI-compatible server started here (selfie's vLLM environment):
SmolLM2-135M-Instruct as the LLM judge, a tiny sequence-classification model behind /classify."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from servers import free_port, vllm_server
from test_vllm import vllm_python  # noqa: F401  (the fixture)

from selfie.errors import SelfieError
from selfie.evaluation.judges import RewardModelJudge, check_judge, load_judge
from selfie.evaluation.labels import score_responses
from selfie.io import read_json, read_jsonl
from selfie.labelling.pairs import select_pairs
from selfie.models import resolve_model_path

from test_loop import recipe_args, run_selfie, selfie_cmd, write_inputs, write_recipe
from tiny import build_tiny_model, build_tiny_reward_model, build_tokenizer

pytestmark = pytest.mark.usefixtures("vllm_python")

QUESTIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name a fruit that is yellow."}],
    [{"role": "user", "content": "How many legs does a spider have?"}],
]
GOOD = ["The capital of France is Paris.", "A banana is yellow.", "A spider has eight legs."]
BAD = ["I like trains.", "The sky is blue today.", "Please ask me something else."]


@pytest.fixture(scope="module")
def llm_server(vllm_python, tmp_path_factory):  # noqa: F811
    with vllm_server(
        vllm_python,
        resolve_model_path("smollm2-135m"),
        "smol",
        tmp_path_factory.mktemp("llm") / "server.log",
        "--max-model-len",
        "2048",
    ) as server:
        yield server


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("rm") / "model", hidden_size=256, seed=1)


@pytest.fixture(scope="module")
def rm_server(vllm_python, reward_model, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("rm-server") / "server.log"
    with vllm_server(vllm_python, reward_model, "rm", log, "--runner", "pooling", "--max-model-len", "512") as server:
        yield server


class OpenRLHFContract(BaseHTTPRequestHandler):
    """OpenRLHF's remote reward model contract (POST {"query": [...]} -> {"rewards": [...]}) serving a real reward
    model; OpenRLHF itself (its vLLM, DeepSpeed and CUDA pins) does not install on this CPU machine."""

    judge: RewardModelJudge

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        tokenizer, model = self.judge.tokenizer, self.judge.model
        with torch.no_grad():
            rewards = [
                model(**tokenizer(q, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item() for q in body["query"]
            ]
        payload = json.dumps({"rewards": rewards}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_a_served_reward_model_scores_as_the_same_model_does_locally(reward_model, rm_server):
    prompts, responses = QUESTIONS + QUESTIONS, GOOD + BAD
    local = RewardModelJudge(str(reward_model), dtype="float32")
    expected = local.score(prompts, responses)
    classify = load_judge(f"classify:{rm_server.url}?model=rm")
    assert classify.score(prompts, responses) == pytest.approx(expected, abs=1e-4)

    OpenRLHFContract.judge = local
    server = ThreadingHTTPServer(("127.0.0.1", 0), OpenRLHFContract)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/get_reward"
        check_judge(f"remote-rm:{url}")
        remote = load_judge(f"remote-rm:{url}?tokenizer={reward_model}&concurrency=2")
        assert remote.score(prompts, responses) == pytest.approx(expected, abs=1e-4)
    finally:
        server.shutdown()


def test_llm_judges_give_finite_scores_and_order_symmetric_preferences(llm_server):
    pointwise = load_judge(f"llm-score:{llm_server.url}/v1?model=smol")
    scores = pointwise.score(QUESTIONS + QUESTIONS, GOOD + BAD)
    assert all(0 <= s <= 5 for s in scores) and pointwise.served_model == "smol"

    pairwise = load_judge(f"llm-pair:{llm_server.url}/v1?model=smol")
    forward = pairwise.score(QUESTIONS + QUESTIONS, GOOD + BAD)
    backward = pairwise.score(QUESTIONS + QUESTIONS, BAD + GOOD)
    assert all(0 <= s <= 1 for s in forward)
    n = len(QUESTIONS)
    for i in range(n):  # the two answers' preferences add up to one, whichever is given first
        assert forward[i] + forward[n + i] == pytest.approx(1.0)
        assert forward[i] == pytest.approx(backward[n + i])
    first, second = pairwise.score_members(QUESTIONS + QUESTIONS, GOOD + BAD)
    assert [(a + b) / 2 for a, b in zip(first, second)] == pytest.approx(forward)


def test_an_unreadable_verdict_drops_the_pair_and_is_counted(llm_server, tmp_path):
    # MT-Bench's pairwise verdict "[[A]]" cannot fit in 2 tokens: no pair is made up from it
    judge = load_judge(f"llm-pair:{llm_server.url}/v1?model=smol&template=mt-bench-pair&max_tokens=2")
    rows = [
        {"prompt_id": f"q{i}", "prompt": q, "responses": [g, b], "finished": [True, True]}
        for i, (q, g, b) in enumerate(zip(QUESTIONS, GOOD, BAD))
    ]
    tokenizer = build_tokenizer()
    judgments = score_responses(judge, rows, tokenizer, {tokenizer.eos_token_id})
    assert all(math.isnan(r) for j in judgments for r in j["rewards"])
    pairs, metrics = select_pairs(rows, judgments)
    assert pairs == [] and metrics["dropped"]["unjudged"] == len(rows)


def test_selfie_judge_labels_a_responses_file_with_a_served_pairwise_judge(llm_server, tiny_policy, tmp_path):
    responses = tmp_path / "responses.jsonl"
    rows = [
        {"prompt_id": f"q{i}", "prompt": q, "responses": [g, b], "finished": [True, True]}
        for i, (q, g, b) in enumerate(zip(QUESTIONS, GOOD, BAD))
    ]
    responses.write_text("".join(json.dumps(row) + "\n" for row in rows))
    judgments, pairs = tmp_path / "judgments.jsonl", tmp_path / "pairs.jsonl"
    spec = f"llm-pair:{llm_server.url}/v1?model=smol"
    run_selfie("judge", "--model", tiny_policy, "--judge", spec, "--responses", str(responses), "--output", str(judgments),
               "--pairs", str(pairs), "--length-penalty", "0")  # fmt: skip
    judged = read_jsonl(judgments)
    assert [j["prompt_id"] for j in judged] == ["q0", "q1", "q2"] and all(j["judge_model"] == "smol" for j in judged)
    assert all(p["agreement"] in (0.5, 1.0) for p in read_jsonl(pairs))
    assert len(read_jsonl(f"{judgments}.answers.jsonl")) == 2 * len(rows)  # each pair asked in both orders


def test_a_down_server_a_wrong_model_and_a_bad_option_are_one_line(llm_server):
    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    cases = {
        f"llm-pair:{closed}?model=smol&retries=0": "no answer after 1 tries",
        f"llm-pair:{llm_server.url}/v1?model=nope": "serves ['smol'], not 'nope'",
        f"llm-score:{llm_server.url}/v1?model=smol&tempo=1": "unknown option 'tempo'",
        f"llm-score:{llm_server.url}/v1?model=smol&api_key_env=SELFIE_TEST_NO_SUCH_KEY": "SELFIE_TEST_NO_SUCH_KEY",
    }
    for spec, message in cases.items():
        with pytest.raises(SelfieError) as error:
            check_judge(spec)
        assert message in str(error.value) and "\n" not in str(error.value), spec


def test_a_dry_run_asks_the_served_labeller_once_and_a_down_one_stops_it_in_one_line(llm_server, tiny_policy, tmp_path):
    recipe = pairwise_recipe(tmp_path, tiny_policy, llm_server.url)
    before = llm_server.posts("/v1/chat/completions")
    assert run_selfie("run", *recipe_args(recipe, tmp_path / "ok", "--dry-run")).returncode == 0
    assert llm_server.posts("/v1/chat/completions") == before  # asked for its models, nothing judged
    down = pairwise_recipe(tmp_path / "down", tiny_policy, f"http://127.0.0.1:{free_port()}", retries="0")
    result = run_selfie("run", *recipe_args(down, tmp_path / "run", "--dry-run"), check=False)
    error = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert error.startswith("selfie: error: recipe key 'judge.labeller'") and "no answer after 1 tries" in error
    assert not (tmp_path / "run").exists()
    spec = f"llm-pair:http://127.0.0.1:{free_port()}/v1?model=smol&retries=0"
    argv = ["eval", "winrate", "--model-a", tiny_policy, "--model-b", tiny_policy, "--judge", spec, "--output"]
    result = run_selfie(*argv, str(tmp_path / "eval"), "--num-prompts", "2", check=False)
    assert result.returncode == 2 and "no answer after 1 tries" in result.stderr.strip().splitlines()[-1]
    assert not list((tmp_path / "eval").glob("responses_*"))  # nothing generated for a judge that cannot answer


# ---- the loop with a served pairwise judge as its labeller


def pairwise_recipe(directory: Path, model: str, server_url: str, **judge: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    prompts, seed = write_inputs(directory)
    recipe = write_recipe(directory, model, prompts, seed)
    config = yaml.safe_load(recipe.read_text())
    options = "&".join(f"{k}={v}" for k, v in {"model": "smol", **judge}.items())
    config["num_iterations"] = 1
    config["data"]["iteration_sizes"] = [8]  # 4 prompts left for evaluation
    config["judge"]["labeller"] = f"llm-pair:{server_url}/v1?{options}"
    config["refine"] = {"soft_agreement": True}  # the pairs' agreement reaches the loss through TRL's trainer
    config["report_to"] = []
    recipe.write_text(yaml.safe_dump(config))
    return recipe


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("policy") / "model", hidden_size=64))


@pytest.fixture(scope="module")
def pairwise_run(llm_server, tiny_policy, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pairwise-run")
    recipe = pairwise_recipe(directory, tiny_policy, llm_server.url)
    run_selfie("run", *recipe_args(recipe, directory / "run"))
    return directory / "run"


def test_a_pairwise_llm_judge_labels_a_loop_and_evaluates_its_iterations(pairwise_run, llm_server, tmp_path):
    judgments = read_jsonl(pairwise_run / "iter_001" / "judgments.jsonl")
    assert judgments and all(j["judge_model"] == "smol" and len(j["member_rewards"]) == 2 for j in judgments)
    pairs = read_jsonl(pairwise_run / "iter_001" / "pairs.jsonl")
    assert pairs and all(p["agreement"] in (0.5, 1.0) for p in pairs)  # the two orders agree, or one does

    output = tmp_path / "eval"
    spec = f"llm-pair:{llm_server.url}/v1?model=smol"
    run_selfie("eval", "run", str(pairwise_run), "--judge", spec, "--output", str(output), "--num-prompts", "4")
    rows = {row["label"].split()[0]: row for row in read_json(output / "report.json")["rows"]}
    assert rows["init"]["score_mean"] == 0.5  # pi_init against its own answers: a tie
    assert 0 <= rows["iter_001"]["score_mean"] <= 1 and rows["iter_001"]["n"] + rows["iter_001"]["unjudged"] == 4


def test_a_judge_stage_killed_mid_way_resumes_without_asking_again(pairwise_run, llm_server, tiny_policy, tmp_path):
    recipe = pairwise_recipe(tmp_path, tiny_policy, llm_server.url, concurrency="1")
    config = yaml.safe_load(recipe.read_text())
    config["judge"]["signal_folds"] = 0  # the seed stage's check asks the server too: the judge stage is what is killed
    recipe.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    answers = run_dir / "iter_001" / "judgments.answers.rank0.jsonl"
    proc = subprocess.Popen(
        selfie_cmd("run", *recipe_args(recipe, run_dir)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600
    while not (answers.exists() and len(answers.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its judge stage was killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(answers.read_text().splitlines())
    before = llm_server.posts("/v1/chat/completions")
    run_selfie("run", *recipe_args(recipe, run_dir))
    asked = llm_server.posts("/v1/chat/completions") - before
    assert asked == len(answers.read_text().splitlines()) - kept  # only what had no answer yet
    assert read_jsonl(run_dir / "iter_001" / "judgments.jsonl") == read_jsonl(pairwise_run / "iter_001" / "judgments.jsonl")


# ---- AlpacaEval's own evaluator reads what `selfie answers` writes, with the local server as its annotator


def test_alpaca_eval_scores_selfie_answers_against_a_local_reference_with_the_local_judge(
    eval_python, pairwise_run, tiny_policy, llm_server, tmp_path
):
    questions = tmp_path / "questions.json"
    instructions = ["Name a colour.", "Say hello.", "Count to three.", "Name an animal."]
    questions.write_text(json.dumps([{"instruction": i, "dataset": "selfie-test"} for i in instructions]))
    outputs, reference = tmp_path / "model_outputs.json", tmp_path / "reference_outputs.json"
    run_selfie("answers", str(pairwise_run), "--questions", str(questions), "--format", "alpaca-eval", "--output", str(outputs))
    run_selfie(
        "answers", "--model", tiny_policy, "--questions", str(questions), "--format", "alpaca-eval",
        "--output", str(reference), "--generator", "pi_init", "--max-new-tokens", "12",
    )  # fmt: skip
    annotators = tmp_path / "annotators" / "local_judge"
    annotators.mkdir(parents=True)
    (annotators / "configs.yaml").write_text(yaml.safe_dump({"local_judge": alpaca_eval_judge(eval_python)}))
    client = tmp_path / "client.yaml"  # AlpacaEval's way to an OpenAI-compatible server
    client.write_text(yaml.safe_dump({"default": [{"api_key": "unused", "base_url": f"{llm_server.url}/v1"}]}))
    before = llm_server.posts("/v1/chat/completions")
    result = subprocess.run(
        [eval_python, "-m", "alpaca_eval.main", "evaluate", "--model_outputs", str(outputs),
         "--reference_outputs", str(reference), "--annotators_config", str(annotators / "configs.yaml"),
         "--output_path", str(tmp_path / "results"), "--fn_metric", "get_winrate", "--sort_by", "win_rate",
         "--precomputed_leaderboard", "None", "--is_cache_leaderboard", "False", "--caching_path", "None"],
        capture_output=True, text=True, cwd=tmp_path,
        env=os.environ | {"OPENAI_CLIENT_CONFIG_PATH": str(client), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    annotations = json.loads(next((tmp_path / "results").rglob("annotations.json")).read_text())
    assert sorted(a["instruction"] for a in annotations) == sorted(instructions)
    assert all(1 <= a["preference"] <= 2 for a in annotations)  # 1: the reference wins, 2: selfie's answer wins
    generator = json.loads(outputs.read_text())[0]["generator"]
    leaderboard = (next((tmp_path / "results").rglob("leaderboard.csv"))).read_text()
    assert generator in leaderboard and "win_rate" in leaderboard
    assert llm_server.posts("/v1/chat/completions") - before == len(instructions)  # the local server judged


def alpaca_eval_judge(eval_python: str) -> dict:
    """AlpacaEval 2's weighted judge (its `weighted_alpaca_eval_vllm_llama3_70b` config) with the local model."""
    package = subprocess.run(
        [eval_python, "-c", "import alpaca_eval, os; print(os.path.dirname(alpaca_eval.__file__))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    return {
        "prompt_template": f"{package}/evaluators_configs/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt",
        "fn_completions": "openai_completions",
        "completions_kwargs": {
            "model_name": "smol", "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 5,
            "requires_chatml": True,
        },
        "fn_completion_parser": "logprob_parser",
        "completion_parser_kwargs": {"numerator_token": "m", "denominator_tokens": ["m", "M"], "is_binarize": False},
        "completion_key": "completions_all",
        "batch_size": 1,
    }  # fmt: skip
