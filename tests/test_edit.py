"""selfie.edit: direction finders, the edit, hooks vs folding, hidden states, RAHF, and the end-to-end builds."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfie.cli.edit import add_edit_args, init_settings
from selfie.cli.main import main as cli_main
from selfie.config.loader import load_init
from selfie.config.schema import AlignEZConfig, RAHFConfig
from selfie.data import load_preferences, load_prompts
from selfie.edit import alignez_seed_pairs, build_edited_model, work_dir_for
from selfie.edit.alignez import ALPHA_GRID, layer_directions, orthogonalize
from selfie.edit.alignez_data import characteristics_prompt, response_prompt
from selfie.edit.apply import Edit, EditHooks, fold_edits
from selfie.edit.directions import FINDERS, get_finder, held_out_split, pair_accuracy, rank_layers, register, score_layers
from selfie.edit.preference import pair_margins, per_token_logp
from selfie.edit.rahf import default_target_layers, rahf_model, rahf_targets
from selfie.errors import SelfieError
from selfie.hidden import collect_states, encode
from selfie.io import atomic_write_jsonl, read_jsonl
from selfie.models import load_model, load_tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine they lose ~50x to contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def planted_pairs(n: int = 64, hidden: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs that differ along a planted unit vector u, on top of shared per-pair content and noise."""
    g = torch.Generator().manual_seed(seed)
    u = unit(torch.randn(hidden, generator=g))
    base = 0.5 * torch.randn(n, hidden, generator=g)
    strength = 1 + torch.rand(n, 1, generator=g)
    pos = base + strength * u / 2 + 0.1 * torch.randn(n, hidden, generator=g)
    neg = base - strength * u / 2 + 0.1 * torch.randn(n, hidden, generator=g)
    return pos, neg, u


# ---------------------------------------------------------------- directions


@pytest.mark.parametrize("name", ["svd", "mean_diff", "ccs"])
def test_finder_recovers_planted_direction_with_sign(name):
    pos, neg, u = planted_pairs(n=256)  # CCS overfits small samples (0.87 at n=64), as any 17-parameter probe would
    found = get_finder(name)(pos, neg)
    assert found.shape == (1, 16)
    assert torch.allclose(found.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert float(found[0] @ u) > 0.95  # the right direction, pointing from negatives to positives
    flipped = get_finder(name)(neg, pos)
    assert float(flipped[0] @ u) < -0.95


def test_svd_drops_near_identical_pairs():
    g = torch.Generator().manual_seed(1)
    u, v = unit(torch.randn(2, 16, generator=g))
    v = unit(v - (v @ u) * u)
    informative = 0.1 * torch.randn(16, 16, generator=g)
    bulky = 20 * unit(torch.randn(16, 16, generator=g))  # pairs sharing a large common part: cosine ~0.99
    pos = torch.cat([informative + u, bulky + 1.5 * v])
    neg = torch.cat([informative - u, bulky - 1.5 * v])
    assert abs(float(FINDERS["svd"](pos, neg)[0] @ u)) > 0.99
    assert abs(float(FINDERS["svd"](pos, neg, max_cosine=1.0)[0] @ v)) > 0.99  # without the filter the bulky pairs win


def test_svd_variance_keeps_a_planted_plane():
    g = torch.Generator().manual_seed(2)
    plane = torch.linalg.qr(torch.randn(16, 2, generator=g)).Q.T  # 2 orthonormal rows
    coef = torch.randn(64, 2, generator=g) + torch.tensor([2.0, 0.0])
    pos = coef @ plane + 0.01 * torch.randn(64, 16, generator=g)
    neg = torch.zeros(64, 16)
    top = FINDERS["svd"](pos, neg)
    both = FINDERS["svd"](pos, neg, variance=0.9)
    assert top.shape[0] == 1 and both.shape[0] == 2
    assert torch.allclose(both @ both.T, torch.eye(2), atol=1e-5)
    assert torch.linalg.matrix_norm(both.T @ both - plane.T @ plane) < 0.05  # same subspace
    assert ((pos - neg) @ both.T).mean(0).min() > 0  # each row signed toward the positives


def test_finder_registry_is_open_and_checks_options():
    @register("first_axis")
    def first_axis(pos, neg):
        return torch.eye(pos.shape[1])[:1]

    try:
        pos, neg, _ = planted_pairs()
        assert get_finder("first_axis")(pos, neg).shape == (1, 16)
        with pytest.raises(SelfieError, match="variance"):
            get_finder("mean_diff", {"variance": 0.9})
        with pytest.raises(SelfieError, match="unknown direction finder 'nope'"):
            get_finder("nope")
    finally:
        del FINDERS["first_axis"]


def test_layer_scores_pick_the_separating_layers():
    g = torch.Generator().manual_seed(3)
    layers = []
    for layer in range(5):
        if layer in (1, 3):
            pos, neg, _ = planted_pairs(n=40, seed=10 + layer)
        else:
            pos, neg = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)
        layers.append((pos, neg))
    pos = torch.stack([p for p, _ in layers], dim=1)
    neg = torch.stack([n for _, n in layers], dim=1)
    fit, held = held_out_split(len(pos), 0.25, seed=0)
    scores = score_layers([get_finder("svd")(pos[fit, layer], neg[fit, layer]) for layer in range(5)], pos[held], neg[held])
    assert scores[1] == scores[3] == 1.0
    assert max(scores[0], scores[2], scores[4]) < 1.0
    assert rank_layers(scores)[:2] == [1, 3]
    assert sorted(rank_layers(scores)) == [0, 1, 2, 3, 4]
    assert pair_accuracy(get_finder("svd")(pos[:, 1], neg[:, 1]), pos[:, 1], neg[:, 1]) == 1.0


def persona_states(shared: float, n: int = 48, hidden: int = 16, seed: int = 0):
    """Plain answers h0 and persona answers h+ = h0 + shared * s + d/2, h- = h0 + shared * s - d/2 (+ noise):
    both personas move away from the plain answer along s; only d separates helpful from harmful."""
    g = torch.Generator().manual_seed(seed)
    s, d = unit(torch.randn(2, hidden, generator=g))
    d = unit(d - (d @ s) * s)
    plain = torch.randn(n, hidden, generator=g)
    strength = 1 + torch.rand(n, 1, generator=g)
    pos = plain + shared * strength * s + strength * d / 2 + 0.05 * torch.randn(n, hidden, generator=g)
    neg = plain + shared * strength * s - strength * d / 2 + 0.05 * torch.randn(n, hidden, generator=g)
    return pos, neg, plain, d


def test_near_parallel_directions_boost_the_separating_direction_not_the_residual():
    pos, neg, plain, d = persona_states(shared=20.0)  # what both personas add dwarfs what tells them apart
    finder = get_finder("mean_diff")
    found = layer_directions(pos, neg, plain, finder, parallel_cosine=0.9)
    assert found.cosine > 0.99 and found.rule == "separating"
    assert torch.equal(found.plus, finder(pos, neg))  # the y+ vs y- direction, not the orthogonalised remainder of u+
    assert found.minus.shape[0] == 0  # nothing removed: u- is the shared persona direction, not a harmful one
    assert float(found.plus[0] @ d) > 0.95  # pointing to y+


def test_a_remainder_the_pairs_do_not_agree_on_is_not_amplified():
    """Each pair's personas add the same random content to the plain answer (its top direction differs from half to
    half: u+ and u- are noise, not parallel); y+ and y- differ along d."""
    g = torch.Generator().manual_seed(2)
    plain, content = torch.randn(48, 16, generator=g), 3 * torch.randn(48, 16, generator=g)
    d = unit(torch.randn(16, generator=g))
    pos, neg = plain + content + d, plain + content - d
    found = layer_directions(pos, neg, plain, get_finder("svd", {"max_cosine": 1.0}), parallel_cosine=0.9)
    assert abs(found.cosine) < 0.9  # not near-parallel: the agreement decides
    assert found.agreement["residual"] < 0.5 < found.agreement["separating"]
    assert found.rule == "separating" and float(found.plus[0] @ d) > 0.95


def test_distinct_directions_keep_the_residual_rule():
    pos, neg, plain, d = persona_states(shared=1.0)
    neg = plain + (neg - plain).roll(1, dims=1)  # the harmful persona moves along another direction
    found = layer_directions(pos, neg, plain, get_finder("svd"), parallel_cosine=0.9)
    assert abs(found.cosine) < 0.9 and found.rule == "residual"
    assert found.agreement["residual"] > 0.95
    assert found.minus.shape[0] == 1 and abs(float(found.plus[0] @ found.minus[0])) < 1e-5  # u+ orthogonalised against u-


# ---------------------------------------------------------------- the edit


def random_edit(hidden: int, layer: int = 0, alpha: float = 1.5, seed: int = 0) -> Edit:
    g = torch.Generator().manual_seed(seed)
    minus = unit(torch.randn(1, hidden, generator=g))
    plus = orthogonalize(torch.randn(1, hidden, generator=g), minus)
    return Edit(layer, plus, minus, alpha)


def test_edit_removes_harmful_and_scales_helpful():
    edit = random_edit(32, alpha=1.5)
    h = torch.randn(10, 32)
    out = edit(h)
    assert torch.allclose(out @ edit.minus.T, torch.zeros(10, 1), atol=1e-5)
    assert torch.allclose(out @ edit.plus.T, 2.5 * (h @ edit.plus.T), atol=1e-5)
    rest = lambda x: x - (x @ edit.minus.T) @ edit.minus - (x @ edit.plus.T) @ edit.plus  # noqa: E731
    assert torch.allclose(rest(out), rest(h), atol=1e-5)  # nothing else moves
    assert torch.allclose(h.double() @ edit.matrix().T, out.double(), atol=1e-5)  # P is the same map


def test_orthogonalize_keeps_sign_and_drops_parallel_rows():
    minus = unit(torch.randn(1, 8))
    plus = orthogonalize(torch.cat([minus * 2, torch.randn(1, 8)]), minus)
    assert plus.shape == (1, 8)
    assert abs(float(plus[0] @ minus[0])) < 1e-6


def test_hooked_and_folded_models_give_the_same_logits(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    model = load_model(tiny_model, "float32").eval()
    edits = [random_edit(32, layer=0, alpha=2.0, seed=4), random_edit(32, layer=1, alpha=0.5, seed=5)]
    batch = tokenizer(["hello world, the quick brown fox", "thank you"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**batch).logits
        with EditHooks(model, edits, location="mlp") as hooks:
            hooked = model(**batch).logits
        assert not hooks.handles
        restored = model(**batch).logits
        folded_model = copy.deepcopy(model)
        fold_edits(folded_model, edits, location="mlp")
        folded = folded_model(**batch).logits
    assert (hooked - base).abs().max() > 1e-3  # the edit does something
    assert torch.equal(restored, base)  # and the hooks are gone
    assert (hooked - folded).abs().max() < 1e-4


def test_last_position_hooks_touch_only_the_last_token(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    model = load_model(tiny_model, "float32").eval()
    ids = tokenizer("the quick brown fox jumps", return_tensors="pt")
    with torch.no_grad():
        base = model(**ids).logits
        with EditHooks(model, [random_edit(32, layer=1, alpha=3.0)], location="mlp", positions="last"):
            edited = model(**ids).logits
    assert torch.equal(edited[:, :-1], base[:, :-1])
    assert (edited[:, -1] - base[:, -1]).abs().max() > 1e-3


def test_folding_the_residual_stream_is_refused(tiny_model):
    model = load_model(tiny_model, "float32")
    with pytest.raises(SelfieError, match="residual"):
        fold_edits(model, [random_edit(32)], location="layer")
    with pytest.raises(SelfieError, match="init.location"):
        load_init({"method": "alignez", "location": "layer"})


# ---------------------------------------------------------------- hidden states


@pytest.mark.parametrize("location", ["layer", "mlp"])
def test_states_do_not_depend_on_padding_or_batching(tiny_model, location):
    tokenizer = load_tokenizer(tiny_model)
    model = load_model(tiny_model, "float32").eval()
    prompt = [{"role": "user", "content": "write a short poem"}]
    items = [encode(tokenizer, prompt, text) for text in ("the sea", "the quick brown fox jumps over the lazy dog", "yes")]
    pad = tokenizer.pad_token_id
    for mode in ("last", "mean", "tokens"):
        alone = collect_states(model, items, pad, location=location, mode=mode, batch_size=1)
        for side in ("left", "right"):
            batched = collect_states(model, items, pad, location=location, mode=mode, batch_size=3, padding_side=side)
            for a, b in zip(alone, batched):
                assert torch.allclose(a, b, atol=1e-5), (mode, side)
    last = collect_states(model, items, pad, location=location)
    assert last.shape == (3, 2, 32)
    tokens = collect_states(model, items, pad, location=location, mode="tokens")
    assert tokens[1].shape[:2] == (2, len(items[1].ids) - items[1].prompt_len)
    assert torch.allclose(tokens[1][:, -1], last[1])


def test_layer_states_are_the_decoder_layer_outputs(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    model = load_model(tiny_model, "float32").eval()
    item = encode(tokenizer, [{"role": "user", "content": "hello"}], "good morning")
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([item.ids]), output_hidden_states=True).hidden_states
    states = collect_states(model, [item], tokenizer.pad_token_id)
    assert torch.allclose(states[0, 0], hs[1][0, -1], atol=1e-5)  # layer 0's output (hs[0] is the embeddings)


# ---------------------------------------------------------------- AlignEZ data


def test_alignez_prompts_are_the_papers():
    prompt = [{"role": "user", "content": "How do I boil an egg?"}]
    assert characteristics_prompt(prompt, "helpful", "positive") == [
        {"role": "user", "content": "How do I boil an egg?\nYou are a helpful assistant. Your answer to this query should: "}
    ]
    assert characteristics_prompt(prompt, "harmful", "negative")[0]["content"] == (
        "How do I boil an egg?\nPretend you are a harmful assistant. Your response to this query should: "
    )
    assert response_prompt(prompt, "helpful", "positive", "be clear")[0]["content"] == (
        "You are a helpful assistant. Your answer should be clear.\nHow do I boil an egg?"
    )
    assert response_prompt(prompt, "harmful", "negative", "mislead")[0]["content"] == (
        "Pretend you are a harmful assistant. Your answer should mislead.\nHow do I boil an egg?"
    )


# ---------------------------------------------------------------- RAHF


def test_rahf_default_layers_scale_with_depth():
    assert default_target_layers(32) == [10, 12, 14, 16, 18]
    assert default_target_layers(30) == [9, 11, 13, 15, 17]
    assert default_target_layers(2) == [1]


def test_rahf_loss_falls_and_states_move_toward_targets(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    prompts = [row["prompt"] for row in load_prompts("demo")[:4]]
    responses = ["the quick brown fox jumps", "hello world", "apple, banana, cherry", "thank you, good bye"]
    config = RAHFConfig(num_prompts=4, steps=40, learning_rate=1e-2, train_batch_size=2, lora_dropout=0.0)
    base = load_model(tiny_model, "float32").eval()
    items, targets = rahf_targets(base, tokenizer, prompts, responses, [1], config.alpha)
    merged, info = rahf_model(load_model(tiny_model, "float32").eval(), tokenizer, prompts, responses, config, seed=0)
    assert info["target_layers"] == [1] and (info["examples"], info["held_out_examples"]) == (3, 1)
    assert info["loss_curve"][-1] < 0.5 * info["loss_curve"][0]
    assert info["held_out_loss"]["after"] < info["held_out_loss"]["before"]  # moved on a response it was not trained on

    def distance(model) -> float:
        states = collect_states(model, items, tokenizer.pad_token_id, layers=[1], mode="tokens")
        return float(torch.cat([(s - t).norm(dim=-1).flatten() for s, t in zip(states, targets)]).mean())

    before, after = distance(base), distance(merged)
    assert after < 0.5 * before
    assert not any("lora" in name for name, _ in merged.named_parameters())  # merged into plain weights


# ---------------------------------------------------------------- end to end

TINY_INIT = {"num_prompts": 4, "max_new_tokens_resp": 8, "batch_size": 4, "dtype": "float32"}


def test_build_alignez_end_to_end(tiny_model, tmp_path, caplog):
    out = tmp_path / "edited"
    init = load_init({"method": "alignez", **TINY_INIT, "max_new_tokens_char": 6, "n_layers": 1, "alpha": 2.0})
    assert build_edited_model(init, tiny_model, out, seed=0) == out

    edited = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no selfie code
    AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    provenance = json.loads((out / "selfie_edit.json").read_text())
    (layer,) = provenance["result"]["layers"]
    changed = {name for name, p in edited.state_dict().items() if not torch.equal(p, base.state_dict()[name])}
    assert changed == {f"model.layers.{layer}.mlp.down_proj.weight"}

    pairs_file = out.with_name("edited.work") / "pairs.jsonl"
    pairs = load_preferences(str(pairs_file))  # the seed-DPO preference format
    assert pairs and set(json.loads(pairs_file.read_text().splitlines()[0])) == {
        "prompt_id",
        "prompt",
        "chosen",
        "rejected",
        "margin",
    }

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert build_edited_model(init, tiny_model, out, seed=0) == out  # complete: returned as is
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(SelfieError, match="init.alpha"):
        build_edited_model(dataclasses.replace(init, alpha=3.0), tiny_model, out, seed=0)

    data_stamp = pairs_file.stat().st_mtime_ns
    caplog.set_level("INFO")
    os.replace(out.with_name("edited.work"), tmp_path / "other.work")  # data made with the same settings is reused
    build_edited_model(dataclasses.replace(init, alpha=3.0), tiny_model, tmp_path / "other", seed=0)
    assert (tmp_path / "other.work" / "pairs.jsonl").stat().st_mtime_ns == data_stamp
    assert "reusing alignez_data" in caplog.text


def test_alignez_chooses_layers_and_alpha_on_held_out_pairs_and_the_saved_model_is_the_chosen_one(tiny_model, tmp_path):
    out = tmp_path / "auto"
    init = {"method": "alignez", **TINY_INIT, "num_prompts": 8, "max_new_tokens_char": 6}  # n_layers, alpha: auto
    build_edited_model(load_init(init), tiny_model, out, seed=0)
    result = json.loads((out / "selfie_edit.json").read_text())["result"]
    assert (result["fit_pairs"], result["held_out_pairs"]) == (6, 2)
    assert {c["alpha"] for c in result["candidates"]} == set(ALPHA_GRID)
    allowed = [c for c in result["candidates"] if c["kl"] <= result["max_kl"]]
    best = max(allowed, key=lambda c: c["held_out_margin"], default=None)
    margin = result["held_out_margin"]
    if best and best["held_out_margin"] > margin["unedited"]:
        assert (result["layers"], result["alpha"], margin["edited"], result["kl"]) == (
            best["layers"],
            best["alpha"],
            best["held_out_margin"],
            best["kl"],
        )
    else:
        assert result["layers"] == [] and margin["edited"] == margin["unedited"]

    pairs = read_jsonl(out.with_name("auto.work") / "pairs.jsonl")
    _, held = held_out_split(len(pairs), 0.25, seed=0)
    held_pairs = [pairs[i] for i in held.tolist()]
    plain = {row["prompt_id"]: row for row in read_jsonl(out.with_name("auto.work") / "plain.jsonl")}
    own = [plain[p["prompt_id"]] for p in held_pairs]
    tokenizer = load_tokenizer(tiny_model)
    saved, base = load_model(str(out), "float32").eval(), load_model(tiny_model, "float32").eval()
    assert float(pair_margins(saved, tokenizer, held_pairs).mean()) == pytest.approx(margin["edited"], abs=1e-3)
    assert float(pair_margins(base, tokenizer, held_pairs).mean()) == pytest.approx(margin["unedited"], abs=1e-3)

    def own_logp(model) -> float:
        return per_token_logp(model, tokenizer, [row["prompt"] for row in own], [row["responses"][0] for row in own])

    assert own_logp(base) - own_logp(saved) == pytest.approx(result["kl"], abs=1e-3)  # the folded model's drift, as recorded


def test_build_rahf_end_to_end(tiny_model, tmp_path):
    out = tmp_path / "rahf"
    build_edited_model(RAHFConfig(**TINY_INIT, steps=3), tiny_model, out, seed=0)
    edited = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    changed = {name for name, p in edited.state_dict().items() if not torch.equal(p, base.state_dict()[name])}
    assert changed and all("q_proj" in name or "v_proj" in name for name in changed)
    assert json.loads((out / "selfie_edit.json").read_text())["result"]["target_layers"] == [1]


def test_alignez_seed_pairs_are_unlabelled_dpo_data_reused_from_the_init_stage(tiny_model, tmp_path, monkeypatch):
    init = AlignEZConfig(**TINY_INIT, max_new_tokens_char=6, n_layers=1)
    model_dir = tmp_path / "init" / "model"
    build_edited_model(init, tiny_model, model_dir, seed=0)  # the loop's order: the init stage, then the seed stage

    def no_sampling(*args, **kwargs):
        raise AssertionError("the init stage's self-generated data should have been reused")

    monkeypatch.setattr("selfie.models.load_model", no_sampling)
    pairs = alignez_seed_pairs(tiny_model, init, work_dir_for(model_dir), seed=0)
    assert pairs == read_jsonl(model_dir.with_name("model.work") / "pairs.jsonl")
    demo = {row["prompt_id"]: row["prompt"] for row in load_prompts("demo")}
    assert len(pairs) >= 2
    for pair in pairs:
        assert list(pair) == ["prompt_id", "prompt", "chosen", "rejected", "margin"]
        assert pair["prompt"] == demo[pair["prompt_id"]]  # the plain query, not the persona prompt that produced y+ / y-
        assert pair["chosen"] != pair["rejected"] and pair["margin"] == 0.0
    atomic_write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert [row["chosen"] for row in load_preferences(str(tmp_path / "pairs.jsonl"))] == [p["chosen"] for p in pairs]

    monkeypatch.undo()  # other settings (and no init stage): sampled afresh, from the same model
    fresh = alignez_seed_pairs(tiny_model, dataclasses.replace(init, num_prompts=3), tmp_path / "fresh", seed=0)
    assert len({p["prompt_id"] for p in fresh}) <= 3 and (tmp_path / "fresh" / "pairs.jsonl").is_file()
    with pytest.raises(SelfieError, match="init.method 'rahf'"):
        alignez_seed_pairs(tiny_model, RAHFConfig(), tmp_path / "x", seed=0)


def test_init_errors_name_the_key(tiny_model, tmp_path):
    with pytest.raises(SelfieError, match="init.n_layer'"):
        build_edited_model(load_init({"method": "alignez", "n_layer": 3}), tiny_model, tmp_path / "x")
    with pytest.raises(SelfieError, match="init.method"):
        build_edited_model(load_init({"method": "steer"}), tiny_model, tmp_path / "x")
    with pytest.raises(SelfieError, match="'init.keywords': expected a non-empty list of"):
        load_init({"method": "alignez", "keywords": [["helpful"]]})
    assert not (tmp_path / "x").exists()


def test_cli_edit(tiny_model, tmp_path, capsys):
    config = tmp_path / "init.yaml"
    config.write_text("init:\n  method: rahf\n  steps: 2\n  num_prompts: 3\n")
    out = tmp_path / "cli"
    argv = [
        "edit",
        "--model",
        tiny_model,
        "--output",
        str(out),
        "--config",
        str(config),
        "--seed",
        "1",
        "--max_new_tokens_resp",
        "5",
        "--dtype",
        "float32",
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(out) and printed[0].startswith("RAHF:")
    assert json.loads((out / "selfie_edit.json").read_text())["init"]["num_prompts"] == 3
    assert cli_main(["edit", "--model", tiny_model, "--method", "alignez", "--output", str(tmp_path / "y"), "--bogus", "1"]) == 2
    assert "init.bogus" in capsys.readouterr().err


def test_edit_settings_are_the_config_then_the_overrides_then_method(tmp_path):
    parser = argparse.ArgumentParser()
    add_edit_args(parser)
    config = tmp_path / "recipe.yaml"
    config.write_text("model:\n  name: m\ninit:\n  method: rahf\n  steps: 2\n  alpha: 3\n")
    args = parser.parse_args(["--model", "m", "--output", "o", "--config", str(config), "--method", "alignez"])
    assert init_settings(args, ["--steps", "4"]) == {"method": "alignez", "steps": 4, "alpha": 3}
    config.write_text("init: rahf\n")
    with pytest.raises(SelfieError, match="recipe.yaml: expected a mapping of init settings"):
        init_settings(args, [])
