"""Evaluation: judges, and what is measured with them.

- judges.py   `Judge` (score(prompts, responses) -> list[float]) and `load_judge(spec)`, specs
              `reward-model:PATH_OR_HUB_ID`, `callable:module.path:function`, `implicit:MODEL[@ADAPTER_DIR][?beta=B]`.
              They score for `selfie eval`, the eval stage, `data.seed_judge` and `judge.labeller`; the loop's
              own implicit-reward labeller is selfie/labelling/implicit_reward.py.
- remote_judges.py  the judges served over HTTP (`remote-rm:`, `classify:`, `llm-score:`, `llm-pair:`), with
              judge_templates.py (the LLM judges' prompts and verdicts) and http.py (requests, retries, the answer log).
- judge_inputs.py  what every judge reads of a (prompt, response): the reward model's text, the question, groups.
- stats.py    win rate (ties count half), bootstrap intervals, length-adjusted win rate: numbers only.
- labels.py   judge accuracy on labelled pairs, agreement with self-labels, labelling sampled responses.
- compare.py  model-vs-model win rate, per-iteration scores of a run, the loop's eval stage.
- report.py   report.json, report.md, report.png.
- answers.py  benchmark question files read and answer files written (AlpacaEval 2, Arena-Hard-Auto v2.0, MT-Bench),
              multi-turn questions answered turn by turn.
The `selfie eval winrate | accuracy | run` verb is selfie/cli/eval.py; `selfie answers` is selfie/cli/answers.py.
"""
