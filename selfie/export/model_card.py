"""The model card (README.md) of an export, in the hub's format: YAML metadata, then how to load the model,
how it was trained, the run summary table, eval results where the run has them, and the recipe."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from selfie.config.schema import RecipeConfig
from selfie.io import read_json
from selfie.models import is_local
from selfie.run.rundir import RunContext
from selfie.run.tracking import eval_headline, summary_markdown, summary_rows

# the hub model each built-in alias was quantised from (its GGUF file is not on the hub under this name)
BUILTIN_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
NOT_HUB_DATASETS = {"demo", "demo-seed", "alignez"}


def base_model_id(config: RecipeConfig) -> str | None:
    """The hub model the export descends from, for the metadata; None for a local model."""
    name = config.model.name
    return BUILTIN_HUB_IDS.get(name) or (None if is_local(name) else name)


def hub_datasets(config: RecipeConfig) -> list[str]:
    sources = [config.data.prompts, config.data.seed_pairs]
    return list(dict.fromkeys(s for s in sources if s and s not in NOT_HUB_DATASETS and not is_local(s)))


def card_data(config: RecipeConfig, adapter_only: bool) -> ModelCardData:
    tags = ["selfie", "spa", "dpo", "self-generated-preferences", "lora"] + ([config.init.method] if config.init else [])
    return ModelCardData(
        base_model=base_model_id(config),
        library_name="peft" if adapter_only else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=hub_datasets(config) or None,
    )


def usage(location: str, on_hub: bool, adapter_reference: str | None) -> str:
    """How to load the export from `location` (a hub repo id when `on_hub`, else the export directory)."""
    if adapter_reference is None:
        return (
            "A standalone model (pi_init and the adapter merged); it needs no selfie code:\n\n```python\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{location}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{location}")\n```'
        )
    if not Path(adapter_reference).is_absolute():
        return (
            f"A PEFT LoRA adapter on the hub model `{adapter_reference}` (its `base_model_name_or_path`):\n\n```python\n"
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{location}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{adapter_reference}")\n```'
        )
    # transformers finds the adapter at the top of the repo even when asked for subfolder="base", so load by path
    fetch = f'path = snapshot_download("{location}")' if on_hub else f'path = "{location}"'
    return (
        "A PEFT LoRA adapter; its base (the run's pi_init) is in `base/`. `base_model_name_or_path` names it by "
        f"absolute path, `{adapter_reference}`, so `AutoPeftModelForCausalLM.from_pretrained` works while the "
        "export stays there; anywhere else load the base from `base/`:\n\n```python\n"
        + ("from huggingface_hub import snapshot_download\n" if on_hub else "")
        + "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"{fetch}\n"
        'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{path}/base"), path)\n'
        'tokenizer = AutoTokenizer.from_pretrained(f"{path}/base")\n```'
    )


def base_description(config: RecipeConfig) -> str:
    name = config.model.name
    text = f"`{name}`"
    if name in BUILTIN_HUB_IDS:
        text += f" (the built-in alias of `{BUILTIN_HUB_IDS[name]}`, dequantised from its GGUF)"
    if config.init:
        text += f", representation-edited first ({config.init.method}; the edit is in the weights): the edited model is pi_init"
    return text


def seed_description(config: RecipeConfig, seed_metrics: dict) -> str:
    d = config.data
    if d.seed_pairs == "alignez":
        source = "AlignEZ's self-generated pairs (no human label)"
    elif d.seed_pairs:
        source = f"`{d.seed_pairs}`"
    else:
        source = f"the seed slice of `{d.prompts}`" + (f", labelled by the judge `{d.seed_judge}`" if d.seed_judge else "")
    return f"{seed_metrics.get('pairs', '?')} pairs from {source}, {seed_metrics.get('epochs', '?')} epoch(s)"


def refinement_description(config: RecipeConfig, iteration: int, metrics: dict[int, dict]) -> str:
    if not iteration:
        return "none (only the seed stage is in this export)"
    r = config.refine
    used = [metrics.get(t, {}).get("train", {}).get("lambda", "?") for t in range(1, iteration + 1)]
    lambdas = ", ".join(f"{value} (iteration {t})" for t, value in enumerate(used, 1))
    return (
        f"label smoothing {r.alpha} for pairs below the {r.quantile} quantile of the margins of the last {r.window_steps} "
        f"steps (none in the first {r.warmup_fraction} of steps); de-coupled noise detection lambda {lambdas}"
    )


def training(config: RecipeConfig, iteration: int, metrics: dict[int, dict]) -> str:
    d, g, lora, train = config.data, config.generate, config.lora, config.train
    sizes = ", ".join(f"{n:g}" for n in d.iteration_sizes[:iteration]) or "-"
    lines = [
        "Trained with selfie by SPA (Spread Preference Annotation, arXiv 2406.04412): DPO of a LoRA adapter on a small "
        "seed of preference pairs, then per iteration generate responses with the current policy, label them with its "
        "implicit DPO reward against pi_init, and train with noise-aware DPO.",
        "",
        f"- base model: {base_description(config)}",
        f"- seed (iteration 0): {seed_description(config, metrics.get(0, {}).get('seed', {}))}",
        f"- SPA iterations: {iteration} (prompts per iteration: {sizes} from `{d.prompts}`, {g.num_responses} responses each, "
        f"up to {g.max_new_tokens} new tokens, temperature {g.temperature})",
        f"- judge: implicit reward, beta {config.train.beta}" + (", length-normalised" if config.judge.length_normalize else ""),
        f"- DPO: beta {train.beta}, learning rate {train.learning_rate}, {train.num_train_epochs} epoch(s) per iteration; "
        f"LoRA r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout} on {', '.join(lora.target_modules)}",
        f"- refinement: {refinement_description(config, iteration, metrics)}",
        f"- random seed {config.seed}",
    ]
    return "\n".join(lines)


def evaluation(rows: list[dict]) -> str | None:
    results = [f"- iteration {row['iteration']}: {eval_headline(row['eval'])}" for row in rows if row.get("eval")]
    return "\n".join(results) if results else None


def build_card(
    ctx: RunContext, iteration: int, *, adapter_reference: str | None, output: Path, repo_id: str | None = None
) -> ModelCard:
    """The card of iteration `iteration` of a run, exported to `output` (and pushed to `repo_id` when given)."""
    config, run_dir = ctx.config, ctx.run_dir
    metrics = {t: read_json(ctx.metrics(t)) for t in range(iteration + 1) if ctx.metrics(t).is_file()}
    rows = summary_rows(metrics)
    sections = [
        f"# {config.run_name or run_dir.name}, iteration {iteration}",
        usage(repo_id or str(output.resolve()), repo_id is not None, adapter_reference),
        "## How it was trained\n\n" + training(config, iteration, metrics),
        "## Run summary\n\n" + summary_markdown(rows).rstrip(),
    ]
    if (results := evaluation(rows)) is not None:
        sections.append("## Evaluation\n\nThe run's eval stage (held-out prompts, judge as named):\n\n" + results)
    recipe = ctx.config_file.read_text(encoding="utf-8").rstrip()
    sections.append(f"## Recipe\n\nThe run's resolved `config.yaml`:\n\n```yaml\n{recipe}\n```")
    metadata = card_data(config, adapter_only=adapter_reference is not None).to_yaml()
    return ModelCard(f"---\n{metadata}\n---\n\n" + "\n\n".join(sections) + "\n")
