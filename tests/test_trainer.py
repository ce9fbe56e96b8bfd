"""NoiseAwareDPOTrainer on the tiny model: the loss against docs/METHOD.md (section 1.7) by hand, against stock TRL, learning, stages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import DPOTrainer
from trl.trainer.utils import use_adapter

from selfie.config.loader import load_recipe
from selfie.config.schema import JudgeConfig, RecipeConfig, RefineConfig, TrainConfig
from selfie.errors import SelfieError
from selfie.io import read_jsonl
from selfie.models import load_adapter, load_model, load_tokenizer, merge_adapter
from selfie.training.arguments import NoiseAwareDPOConfig, build_dpo_config, dnd_lambda, seed_epochs
from selfie.training.stage import TrainOutputs, _pairs_dataset, train_iteration, train_seed
from selfie.training.trainer import REFINE_STATE, TRL_INTERNALS, NoiseAwareDPOTrainer, last_checkpoint

from tiny import perturb_adapter, toy_pairs


def recipe(**sections) -> RecipeConfig:
    base = {
        "report_to": [],
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-3,
            "save_steps": 100,
            "max_length": 128,
        },
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return load_recipe(None, base)


def outputs(directory: Path) -> TrainOutputs:
    """A stage's outputs laid out as a run directory lays them out."""
    return TrainOutputs(directory / "adapter", directory / "checkpoints")


def make_trainer(
    tiny_model, prev_adapter, tmp_path, cls=NoiseAwareDPOTrainer, *, lam=0.5, alpha=0.1, quantile=0.5, window=3, n=4
):
    """A trainer for iteration t >= 1 (continued adapter, TRL's "ref" copy as reference), policy moved off it."""
    model = load_adapter(load_model(tiny_model), prev_adapter, trainable=True)
    refine = RefineConfig(alpha=alpha, quantile=quantile, window_steps=window, warmup_fraction=0.2)
    args = build_dpo_config(
        TrainConfig(per_device_train_batch_size=n),
        refine,
        tmp_path,
        lambda_=lam,
        refine_on=True,
        report_to=[],
        run_name=None,
        seed=0,
        max_steps=10,
    )
    trainer = cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(toy_pairs(n)).select_columns(["prompt", "chosen", "rejected"]),
        processing_class=load_tokenizer(tiny_model),
    )
    perturb_adapter(trainer.model, seed=2)
    trainer.model.train()
    trainer.state.global_step, trainer.state.max_steps = 5, 10  # past the warm-up (20% of 10 steps)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    return trainer, batch


def sequence_logps(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Sum of log_softmax over the completion tokens, from full [N, T, V] logits."""
    mask = batch["completion_mask"][:, 1:].float()
    token = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token * mask).sum(1)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_matches_the_method_formula_by_hand(tiny_model, prev_adapter, tmp_path):
    beta, lam, alpha, q = 0.1, 0.5, 0.1, 0.5
    trainer, batch = make_trainer(tiny_model, prev_adapter, tmp_path, lam=lam, alpha=alpha, quantile=q)
    model = trainer.model
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    # docs/METHOD.md section 1.7, with full logits
    policy_logits = model(**inputs).logits
    with torch.no_grad(), use_adapter(model, "ref"):
        ref_logits = model(**inputs).logits
    policy, ref = sequence_logps(policy_logits, batch), sequence_logps(ref_logits, batch)
    extrapolated = sequence_logps(((1 + lam) * policy_logits - lam * ref_logits).detach(), batch)
    (pc, pr), (rc, rr), (ec, er) = policy.chunk(2), ref.chunk(2), extrapolated.chunk(2)
    margins = beta * ((ec - er) - (rc - rr))
    median = margins.median().item()
    tau = torch.quantile(torch.tensor([median - 5.0, median + 5.0] + margins.tolist(), dtype=torch.float64), q).item()
    eps = alpha * (margins < tau).float()
    assert 0 < eps.count_nonzero() < len(eps)
    z = (pc - rc) - (pr - rr)
    expected = (-(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)).mean()
    expected.backward()
    expected_grads = lora_grads(model)
    model.zero_grad()

    # two earlier optimizer steps (3 and 4), symmetric around the batch's median, so tau stays that median
    trainer.window.load_state_dict({"steps": 3, "completed": [[median - 5.0]], "step": 4, "current": [median + 5.0]})
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert trainer._metrics["train"]["refine/tau"] == [pytest.approx(tau, abs=1e-5)]
    assert trainer._metrics["train"]["refine/smoothed_fraction"] == [pytest.approx(eps.count_nonzero().item() / len(eps))]
    assert trainer._metrics["train"]["refine/margin_mean"][0] == pytest.approx(margins.mean().item(), abs=1e-5)
    assert trainer.window.current == pytest.approx(margins.tolist(), abs=1e-5) and len(trainer.window.completed) == 2


def test_training_rows_keep_the_pairs_agreement_and_a_pair_without_one_counts_as_agreed(tiny_model):
    pairs = toy_pairs(2)
    pairs[0]["agreement"] = 0.5
    tokenizer = load_tokenizer(tiny_model)
    assert _pairs_dataset(pairs, tokenizer, {tokenizer.eos_token_id})["agreement"] == [0.5, 1.0]
    assert "agreement" not in _pairs_dataset(toy_pairs(2), tokenizer, {tokenizer.eos_token_id}).column_names


def test_soft_agreement_trains_each_pair_on_the_label_its_agreement_gives(tiny_model, prev_adapter, tmp_path):
    trainer, batch = make_trainer(tiny_model, prev_adapter, tmp_path, lam=0.0, alpha=0.0)
    trainer.args.refine_soft_agreement = True
    trainer._set_signature_columns_if_needed()
    assert "agreement" in trainer._signature_columns  # the Trainer keeps the column for the loss
    agreement = torch.tensor([1.0, 0.5, 0.75, 1.0])
    examples = [{**trainer.train_dataset[i], "agreement": c} for i, c in enumerate(agreement.tolist())]
    batch = trainer.data_collator(examples)
    torch.testing.assert_close(batch["agreement"], agreement)
    model, beta = trainer.model, trainer.beta
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        policy = sequence_logps(model(**inputs).logits, batch)
        with use_adapter(model, "ref"):
            ref = sequence_logps(model(**inputs).logits, batch)
    (pc, pr), (rc, rr) = policy.chunk(2), ref.chunk(2)
    z = (pc - rc) - (pr - rr)
    expected = (-agreement * F.logsigmoid(beta * z) - (1 - agreement) * F.logsigmoid(-beta * z)).mean()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_alpha_zero_is_stock_trl_dpo(tiny_model, prev_adapter, tmp_path, lam):
    ours, batch = make_trainer(tiny_model, prev_adapter, tmp_path / "ours", lam=lam, alpha=0.0)
    stock, stock_batch = make_trainer(tiny_model, prev_adapter, tmp_path / "stock", DPOTrainer, lam=lam, alpha=0.0)
    results = []
    for trainer, inputs in ((ours, batch), (stock, stock_batch)):
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        results.append((loss.detach(), lora_grads(trainer.model), dict(trainer._metrics["train"])))
    (loss, grads, metrics), (stock_loss, stock_grads, stock_metrics) = results
    assert abs(loss.item() - stock_loss.item()) <= 1e-6 and loss.item() != pytest.approx(0.6931, abs=1e-4)
    assert grads.keys() == stock_grads.keys() and all(".default." in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], stock_grads[name], rtol=0, atol=1e-6, msg=name)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert metrics[key] == stock_metrics[key], key
    assert {"refine/tau", "refine/margin_mean", "refine/smoothed_fraction"} <= metrics.keys()
    if lam == 0.0:  # without DND the confidence margin is the DPO implicit reward margin
        assert metrics["refine/margin_mean"][0] == pytest.approx(stock_metrics["rewards/margins"][0], abs=1e-6)


class KeepLogs(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []
        self.run_name: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.run_name = args.run_name
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def test_short_run_learns_the_toy_preference_and_smooths_about_k(tiny_model, prev_adapter, tmp_path):
    logs = KeepLogs()
    config = recipe(
        train={"per_device_train_batch_size": 8, "learning_rate": 3e-3, "num_train_epochs": 1},
        refine={"quantile": 0.25, "window_steps": 4, "warmup_fraction": 0.2},
    )
    metrics = train_iteration(
        tiny_model, prev_adapter, toy_pairs(24), outputs(tmp_path / "iter_001"), config, 1, callbacks=[logs], max_steps=30
    )
    assert metrics["steps"] == 30 and metrics["lambda"] == 0.5 and metrics["refine_alpha"] == 0.1
    first, last = logs.logs[0], logs.logs[-1]
    assert first["rewards/margins"] == 0.0  # step 1: policy == reference == pi_{t-1}
    assert last["rewards/margins"] > 0.2 and last["rewards/accuracies"] == 1.0
    fractions = [log["refine/smoothed_fraction"] for log in logs.logs]  # one log per step
    assert all(f == 0.0 for f in fractions[:6])  # warm-up: the first 20% of 30 steps
    after = sum(fractions[6:]) / len(fractions[6:])
    assert 0.1 <= after <= 0.4, fractions
    assert metrics["refine/smoothed_fraction"] == pytest.approx(after)


def test_seed_stage_trains_a_fresh_adapter_against_the_plain_model(tiny_model, tmp_path):
    logs = KeepLogs()
    named = TrainOutputs(tmp_path / "iter_000" / "adapter", tmp_path / "iter_000" / "checkpoints", run_name="demo-iter_000")
    metrics = train_seed(tiny_model, toy_pairs(8), named, recipe(train={"save_steps": 4}), callbacks=[logs])
    assert logs.run_name == "demo-iter_000"  # the name the caller gave, not one made from the paths
    assert metrics["epochs"] == 3 and metrics["steps"] == 12  # < 2,000 pairs: 3 epochs of 4 steps
    assert metrics["refine_alpha"] == 0.0 and metrics["lambda"] == 0.0
    assert logs.logs[0]["rewards/chosen"] == 0.0 and logs.logs[-1]["rewards/margins"] > 0
    checkpoint = Path(last_checkpoint(tmp_path / "iter_000" / "checkpoints"))
    assert checkpoint.name == "checkpoint-12" and not (checkpoint / "ref").exists()  # reference = adapters disabled
    adapter = tmp_path / "iter_000" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert all(".ref." not in k for k in load_file(adapter / "adapter_model.safetensors"))


def test_iteration_continues_the_adapter_and_saves_only_default(tiny_model, prev_adapter, tmp_path):
    metrics = train_iteration(tiny_model, prev_adapter, toy_pairs(4), outputs(tmp_path / "iter_001"), recipe(), 1, max_steps=2)
    adapter = tmp_path / "iter_001" / "adapter"
    assert metrics["adapter"] == str(adapter) and metrics["resumed_from"] is None
    assert sorted(p.name for p in adapter.iterdir() if p.is_dir()) == []  # no "ref" sub-adapter
    trained, before = load_file(adapter / "adapter_model.safetensors"), load_file(prev_adapter / "adapter_model.safetensors")
    assert trained.keys() == before.keys()
    assert any(not torch.equal(trained[k], before[k]) for k in trained)
    assert (Path(last_checkpoint(tmp_path / "iter_001" / "checkpoints")) / "ref").is_dir()  # TRL's frozen copy


def test_merge_mode_stacks_the_adapters_exactly(tiny_model, prev_adapter, tmp_path):
    config = recipe(train={"adapter_mode": "merge", "save_steps": 2})
    train_iteration(tiny_model, prev_adapter, toy_pairs(4), outputs(tmp_path / "iter_001"), config, 1, max_steps=2)
    adapter = tmp_path / "iter_001" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8  # previous r 4 + new r 4
    trained = merge_adapter(load_adapter(load_model(tiny_model), prev_adapter))  # what the trainer trained on ...
    trained = load_adapter(trained, tmp_path / "iter_001" / "checkpoints" / "checkpoint-2")  # ... plus the new adapter
    stacked = load_adapter(load_model(tiny_model), adapter)
    ids = torch.tensor([[5, 17, 33, 80, 120, 7]])
    with torch.no_grad():
        torch.testing.assert_close(stacked(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_schedules_and_config_mapping(tmp_path):
    refine = RefineConfig()
    assert [dnd_lambda(refine, t) for t in range(6)] == [0.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    assert dnd_lambda(RefineConfig(lambdas=[]), 2) == 0.0
    assert seed_epochs(TrainConfig(), 1999) == 3 and seed_epochs(TrainConfig(), 2000) == 1
    assert seed_epochs(TrainConfig(seed_epochs=2.0), 10) == 2.0
    train = TrainConfig(beta=0.2, learning_rate=1e-4, per_device_train_batch_size=3, gradient_accumulation_steps=5)
    args = build_dpo_config(train, refine, tmp_path, lambda_=0.25, refine_on=True, report_to=[], run_name="r", seed=7)
    assert isinstance(args, NoiseAwareDPOConfig)
    assert (args.beta, args.learning_rate, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (
        0.2,
        1e-4,
        3,
        5,
    )
    assert (args.refine_alpha, args.refine_quantile, args.refine_window_steps, args.dnd_lambda) == (0.1, 0.1, 50, 0.25)
    assert args.bf16 is False and args.seed == 7 and args.warmup_steps == 0.1 and args.loss_type == ["sigmoid"]
    off = build_dpo_config(train, refine, tmp_path, lambda_=0.0, refine_on=False, report_to=[], run_name=None, seed=7, epochs=3)
    assert off.refine_alpha == 0.0 and off.num_train_epochs == 3
    with pytest.raises(ValueError, match="sigmoid"):
        NoiseAwareDPOConfig(output_dir=str(tmp_path), loss_type=["ipo"], bf16=False)


def test_trainer_arguments_default_to_the_recipes_refine_section(tmp_path):
    recipe_refine = load_recipe(None, {}).refine
    args = NoiseAwareDPOConfig(output_dir=str(tmp_path), bf16=False)
    assert (args.refine_alpha, args.refine_quantile, args.refine_window_steps, args.refine_warmup_fraction) == (
        recipe_refine.alpha,
        recipe_refine.quantile,
        recipe_refine.window_steps,
        recipe_refine.warmup_fraction,
    )


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("refine_alpha", "alpha", 0.7),
        ("refine_quantile", "quantile", 1.0),
        ("refine_window_steps", "window_steps", 0),
        ("refine_warmup_fraction", "warmup_fraction", 1.5),
        ("dnd_lambda", "lambdas", -0.5),
    ],
)
def test_trainer_arguments_refuse_what_the_recipe_refuses_in_its_words(tmp_path, name, key, value):
    problem = RefineConfig.out_of_range(key, value)
    assert problem is not None
    with pytest.raises(ValueError, match=re.escape(f"{name}: {problem}")):
        NoiseAwareDPOConfig(output_dir=str(tmp_path), bf16=False, **{name: value})


def test_last_checkpoint_skips_incomplete_ones(tmp_path):
    assert last_checkpoint(tmp_path / "missing") is None
    for step in (2, 4, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}" / REFINE_STATE).write_text("{}")
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")  # checkpoint-10 was cut by a kill


def test_trainer_trains_a_truncated_response_exactly_as_the_judge_scored_it(tiny_model, prev_adapter, tmp_path):
    """Token for token: the judge's policy log-prob of each response equals the one on the trainer's batch."""
    from selfie.labelling.implicit_reward import judge_responses
    from selfie.tokens import stop_token_ids

    model = load_adapter(load_model(tiny_model, "float32"), prev_adapter).eval()
    tokenizer = load_tokenizer(tiny_model)
    prompt = [{"role": "user", "content": "list three fruits please"}]
    responses = [
        {
            "prompt_id": "x",
            "prompt": prompt,
            "responses": ["apple, banana, cherry", "the quick brown fox"],
            "finished": [False, True],
        }
    ]
    judge_responses(
        model,
        tokenizer,
        responses,
        tmp_path / "j.jsonl",
        tmp_path / "p.jsonl",
        judge=JudgeConfig(truncated="keep", length_penalty=0.0),
    )
    (judged,), pairs = read_jsonl(tmp_path / "j.jsonl"), read_jsonl(tmp_path / "p.jsonl")
    stop_ids = stop_token_ids(model.get_base_model(), tokenizer)
    dataset = _pairs_dataset(pairs, tokenizer, stop_ids)
    chosen_is_first = pairs[0]["chosen"][0]["content"] == "apple, banana, cherry"
    truncated_ids = dataset[0]["chosen_ids" if chosen_is_first else "rejected_ids"]
    finished_ids = dataset[0]["rejected_ids" if chosen_is_first else "chosen_ids"]
    assert truncated_ids[-1] not in stop_ids and finished_ids[-1] in stop_ids  # no end-of-turn after a cut response

    args = build_dpo_config(
        TrainConfig(),
        RefineConfig(),
        tmp_path / "ckpt",
        lambda_=0.0,
        refine_on=False,
        report_to=[],
        run_name=None,
        seed=0,
        max_steps=1,
    )
    trainer = NoiseAwareDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    chosen, rejected = sequence_logps(logits, batch).tolist()
    by_text = dict(zip(responses[0]["responses"], judged["policy_logps"]))
    assert chosen == pytest.approx(by_text[pairs[0]["chosen"][0]["content"]], abs=1e-4)
    assert rejected == pytest.approx(by_text[pairs[0]["rejected"][0]["content"]], abs=1e-4)


def test_bad_pairs_are_refused(tiny_model, tmp_path):
    rows = [{k: v for k, v in row.items() if k != "rejected"} for row in toy_pairs(2)]
    with pytest.raises(SelfieError, match="missing column 'rejected'"):
        train_seed(tiny_model, rows, outputs(tmp_path), recipe())
    with pytest.raises(SelfieError, match="empty"):
        train_seed(tiny_model, [], outputs(tmp_path), recipe())
    assert not (tmp_path / "adapter").exists()


def test_the_trl_internals_it_relies_on_are_there(tiny_model, tmp_path):
    """Each private method has the parameters NoiseAwareDPOTrainer calls or overrides it with; the attributes hold
    what it reads. A TRL upgrade that changes one fails here, naming it."""
    import inspect

    import trl.trainer.utils

    trainer = NoiseAwareDPOTrainer(
        model=load_model(tiny_model, "float32"),
        args=build_dpo_config(
            TrainConfig(), RefineConfig(), tmp_path, lambda_=0.0, refine_on=False, report_to=[], run_name=None, seed=0
        ),
        train_dataset=_pairs_dataset(toy_pairs(2), load_tokenizer(tiny_model), set()),
        processing_class=load_tokenizer(tiny_model),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    for name, expected in TRL_INTERNALS.items():
        owner, attribute = name.rsplit(".", 1)
        if owner == "DPOTrainer" and isinstance(expected, tuple):
            method = getattr(DPOTrainer, attribute, None)
            assert method is not None, f"TRL's {name} is gone"
            assert tuple(inspect.signature(method).parameters)[1 : len(expected) + 1] == expected, f"TRL's {name} changed"
        elif owner == "DPOTrainer":
            assert set(trainer._metrics) == {"train", "eval"}, f"TRL's {name} changed"
        elif owner == "CausalLMOutput":
            batch = trainer.data_collator([trainer.train_dataset[0]])
            outputs = trainer.model(input_ids=batch["input_ids"], fused_lm_head=True, labels=batch["input_ids"])
            assert getattr(outputs, attribute, None) is not None, f"TRL's fused LM head no longer returns {attribute}"
        else:
            assert hasattr(trl.trainer.utils, attribute), f"TRL's {name} is gone"
