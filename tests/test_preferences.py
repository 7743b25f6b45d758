"""Preference tuning: pair formats and their errors, masks, the DPO/ORPO losses and gradients against the
papers' formulas written out here on full logits, and a DPO run end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import tiny_lora, write_jsonl

from lorasmith.cli import main
from lorasmith.config import DataConfig
from lorasmith.data.batching import PreferenceLoss, collate_pairs
from lorasmith.data.preferences import iter_pairs, read_pairs, to_pair, tokenize_pairs
from lorasmith.data.template import render
from lorasmith.models.hardware import Precision
from lorasmith.models.loss import preference_loss
from lorasmith.training.step import accumulate_gradients

FP32 = Precision("fp32", "cpu")
Q = "What is the capital of France?"
USER = {"role": "user", "content": Q}
GOOD = {"role": "assistant", "content": "Paris."}
BAD = {"role": "assistant", "content": "Lyon, I think, but I am not sure."}


def _strip(messages):
    return [{"role": m["role"], "content": m["content"]} for m in messages]


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": Q, "chosen": "Paris.", "rejected": BAD["content"]},  # TRL, text
        {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},  # TRL, conversational, explicit prompt
        {"prompt": Q, "chosen": [USER, GOOD], "rejected": [USER, BAD]},  # sides repeat the prompt (UltraFeedback)
        {"chosen": [USER, GOOD], "rejected": [USER, BAD]},  # TRL, implicit prompt
        {"input": {"messages": [USER]}, "preferred_output": [GOOD], "non_preferred_output": [BAD]},  # OpenAI
        {
            "conversations": [{"from": "human", "value": Q}],
            "chosen": {"from": "gpt", "value": "Paris."},
            "rejected": {"from": "gpt", "value": BAD["content"]},
        },  # LLaMA-Factory / ShareGPT
    ],
)
def test_every_pair_shape_reads_as_the_same_prompt_and_sides(record):
    prompt, chosen, rejected = to_pair(record)
    assert (_strip(prompt), _strip(chosen), _strip(rejected)) == ([USER], [GOOD], [BAD])


def test_implicit_prompt_of_multi_turn_conversations_ends_at_the_last_shared_user_turn():
    history = [USER, GOOD, {"role": "user", "content": "And of Italy?"}]
    prompt, chosen, rejected = to_pair(
        {"chosen": [*history, {"role": "assistant", "content": "Rome."}], "rejected": [*history, BAD]}
    )
    assert _strip(prompt) == history and chosen[0]["content"] == "Rome." and rejected[0]["content"] == BAD["content"]


def test_bad_pairs_are_named_with_file_and_line(tmp_path):
    rows = [
        {"prompt": Q, "chosen": "Paris.", "rejected": "Paris."},
        {"prompt": Q, "chosen": "", "rejected": "Lyon."},
        {"prompt": Q, "chosen": [{"role": "user", "content": "Something else?"}, GOOD], "rejected": [BAD]},
        {"messages": [USER, GOOD]},
        {"chosen": [{"role": "user", "content": "A"}, GOOD], "rejected": [{"role": "user", "content": "B"}, BAD]},
        {"prompt": Q, "chosen": "Paris.", "rejected": "Lyon."},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    problems = {where: problem for where, _, problem in iter_pairs(path) if problem}
    assert sorted(problems) == [f"{path}:{n}" for n in (1, 2, 3, 4, 5)]
    assert "identical" in problems[f"{path}:1"]
    assert "`chosen` is empty" in problems[f"{path}:2"]
    assert "prompt mismatch" in problems[f"{path}:3"] and "message 0" in problems[f"{path}:3"]
    assert "not a preference pair" in problems[f"{path}:4"]
    assert "share no prompt" in problems[f"{path}:5"]
    assert len(read_pairs(path, skip_bad=True).conversations) == 1


def test_only_each_completion_and_its_end_of_turn_are_trained_and_the_prompt_tokens_are_shared(tmp_path, tokenizer):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, USER], "chosen": [GOOD], "rejected": [BAD]}]
    pairs = read_pairs(write_jsonl(tmp_path / "p.jsonl", rows)).conversations
    enc = tokenize_pairs(tokenizer, pairs, DataConfig(train="x")).encoded[0]
    prompt_text = render(tokenizer, pairs[0].prompt, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    for side, reply in ((enc.chosen, GOOD["content"]), (enc.rejected, BAD["content"])):
        assert side.input_ids[: len(prompt_ids)] == prompt_ids  # the same prompt tokens on both sides
        assert not any(side.weights[: len(prompt_ids)])  # none of them trained
        trained = tokenizer.decode([t for t, w in zip(side.input_ids, side.weights) if w > 0])
        assert trained == reply + "<|im_end|>"  # the completion and the EOS that ends the turn


def _pairs(tokenizer, n=4):
    rows = [
        {
            "prompt": f"Question {i}: what is {i} + {i}?",
            "chosen": f"{2 * i}.",
            "rejected": f"I believe it is {2 * i + 1}, roughly.",
        }
        for i in range(n)
    ]
    from lorasmith.data.preferences import PreferencePair

    pairs = []
    for i, r in enumerate(rows):
        prompt, chosen, rejected = to_pair(r)
        pairs.append(PreferencePair(prompt, chosen, rejected, f"x:{i}", f"x:{i}"))
    return tokenize_pairs(tokenizer, pairs, DataConfig(train="x")).encoded


def _paper_logps(model, rows, weights):
    """log pi(y | x) of each row from the full logits: the sum over trained positions of log-softmax."""
    logits = model(input_ids=rows).logits[:, :-1].float()
    logp = logits.log_softmax(-1).gather(-1, rows[:, 1:, None]).squeeze(-1)
    return (logp * (weights[:, 1:] > 0)).sum(-1), (weights[:, 1:] > 0).sum(-1)


@pytest.mark.parametrize(("objective", "label_smoothing"), [("dpo", 0.0), ("dpo", 0.2), ("orpo", 0.0)])
def test_loss_and_gradients_equal_the_papers_formulas(tiny_model_dir, tokenizer, objective, label_smoothing):
    model = tiny_lora(tiny_model_dir)
    encoded = _pairs(tokenizer)
    beta, k = 0.3, len(encoded)
    batch = collate_pairs(encoded, tokenizer.pad_token_id, PreferenceLoss(objective, beta, label_smoothing))
    params = [p for p in model.parameters() if p.requires_grad]

    model.zero_grad()
    ours = preference_loss(model, batch, FP32)
    (ours.loss_sum / k).backward()
    ours_grads = [p.grad.clone() for p in params]

    model.zero_grad()
    rows, weights = batch.sides.input_ids, batch.sides.weights
    logps, counts = _paper_logps(model, rows, weights)
    pc, pr = logps[:k], logps[k:]
    if objective == "dpo":  # Rafailov et al. 2023, eq. 7; cDPO label smoothing (Mitchell 2023)
        with torch.no_grad(), model.disable_adapter():
            ref, _ = _paper_logps(model, rows, weights)
        z = beta * ((pc - ref[:k]) - (pr - ref[k:]))
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    else:  # Hong et al. 2024, eq. 6-7: mean token log-probs, odds ratio, plus the chosen side's NLL
        mc, mr = pc / counts[:k], pr / counts[k:]
        log_odds = (mc - mr) - (torch.log(1 - torch.exp(mc)) - torch.log(1 - torch.exp(mr)))
        losses = -mc - beta * F.logsigmoid(log_odds)
    losses.mean().backward()

    assert float(ours.loss_sum.detach()) / k == pytest.approx(float(losses.mean().detach()), rel=1e-5, abs=1e-6)
    for ours_g, p in zip(ours_grads, params):
        torch.testing.assert_close(ours_g, p.grad, rtol=1e-4, atol=1e-7)
    assert any(float(g.abs().max()) > 0 for g in ours_grads)


def test_a_precomputed_reference_equals_the_one_computed_in_the_step(tiny_model_dir, tokenizer):
    from lorasmith.data.preferences import PairSet
    from lorasmith.evaluation.preferences import annotate_reference

    model = tiny_lora(tiny_model_dir)
    encoded = _pairs(tokenizer)
    loss = PreferenceLoss("dpo", 0.1)
    on_the_fly = preference_loss(model, collate_pairs(encoded, tokenizer.pad_token_id, loss), FP32)
    annotate_reference(model, [PairSet([None] * len(encoded), encoded)], FP32, tokenizer.pad_token_id, batch_size=3)
    batch = collate_pairs(encoded, tokenizer.pad_token_id, loss)
    assert batch.reference is not None
    precomputed = preference_loss(model, batch, FP32)
    assert float(precomputed.loss_sum.detach()) == pytest.approx(float(on_the_fly.loss_sum.detach()), rel=1e-5)


def test_accumulation_over_micro_batches_gives_the_gradient_of_the_whole_batch(tiny_model_dir, tokenizer):
    model = tiny_lora(tiny_model_dir)
    encoded, loss, pad = _pairs(tokenizer), PreferenceLoss("dpo", 0.1), tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    whole = accumulate_gradients(model, [collate_pairs(encoded, pad, loss)], FP32)
    grads = [p.grad.clone() for p in params]
    model.zero_grad()
    pieces = accumulate_gradients(model, [collate_pairs(encoded[:1], pad, loss), collate_pairs(encoded[1:], pad, loss)], FP32)
    assert pieces == pytest.approx(whole, rel=1e-5)
    for g, p in zip(grads, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)


def test_a_dpo_run_trains_evaluates_and_resumes_on_the_tiny_model(tmp_path, tiny_model_dir, capsys):
    from lorasmith.data.prefs_demo import generate

    train, val = generate(n_train=24, n_val=8, seed=3)
    data = [f"data.train={write_jsonl(tmp_path / 't.jsonl', train)}", f"data.val={write_jsonl(tmp_path / 'v.jsonl', val)}"]
    common = [f"model={tiny_model_dir}", *data, "train.objective=dpo", "train.lr=1e-3", "train.micro_batch_size=4"]
    common += ["train.compile=false", "eval.samples=1", "eval.max_new_tokens=4", f"output.dir={tmp_path / 'runs'}"]
    assert main(["train", *common, "output.name=a", "train.max_steps=4"]) == 0
    run = tmp_path / "runs" / "a"
    before, after = (json.loads((run / f).read_text()) for f in ("eval_before.json", "eval_after.json"))
    assert before["reward_accuracy"] == 0.0 and before["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference
    assert after["pairs"] == 8 and 0.0 <= after["reward_accuracy"] <= 1.0 and after["loss"] != before["loss"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert "reward_accuracy" in (run / "report.html").read_text()  # the report shows the preference metrics
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r and "lr" in r]
    assert len(losses) == 4

    # `lorasmith eval` scores the same held-out pairs as the run's own evaluation after training.
    assert main(["eval", str(run), "--data", str(tmp_path / "v.jsonl"), "--out", str(tmp_path / "ev")]) == 0
    scored = json.loads((tmp_path / "ev/results.json").read_text())["results"][0]
    assert scored["pairs"] == 8 and scored["loss"] == pytest.approx(after["loss"], abs=2e-2)
    assert "reward_accuracy" in capsys.readouterr().out

    # The same run with the reference computed in every step: the same losses.
    assert main(["train", *common, "output.name=b", "train.max_steps=4", "train.reference=on_the_fly"]) == 0
    other = [r["loss"] for r in map(json.loads, (tmp_path / "runs/b/metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert other == pytest.approx(losses, rel=1e-4)

    # Stopped after 2 of 4 steps (a checkpoint every 2), resumed: the same losses as the uninterrupted run.
    assert main(["train", *common, "output.name=c", "train.max_steps=4", "train.save_every=2"]) == 0
    ckpt = tmp_path / "runs/c/checkpoints/step-0000002"
    assert ckpt.is_dir()
    import shutil

    for later in (tmp_path / "runs/c/checkpoints").glob("step-*"):
        if later != ckpt:
            shutil.rmtree(later)
    (tmp_path / "runs/c/run.json").write_text(json.dumps({"status": "interrupted"}))
    shutil.rmtree(tmp_path / "runs/c/adapter")
    assert main(["train", "--resume", str(tmp_path / "runs/c")]) == 0
    resumed = [r["loss"] for r in map(json.loads, (tmp_path / "runs/c/metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert resumed == pytest.approx(losses, rel=1e-4)


def test_sft_data_under_a_preference_objective_is_refused_with_the_fix(tmp_path, tiny_model_dir, demo_rows, capsys):
    train, _ = demo_rows
    args = [f"model={tiny_model_dir}", f"data.train={write_jsonl(tmp_path / 't.jsonl', train[:4])}", "train.objective=dpo"]
    assert main(["train", *args, f"output.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "not a preference pair" in err and "Traceback" not in err


def test_sft_then_dpo_continues_the_sft_adapter_against_it_and_the_result_merges(tmp_path, tiny_model_dir, demo_rows):
    from lorasmith.data.prefs_demo import generate

    runs = tmp_path / "runs"
    sft_rows, _ = demo_rows
    base = [f"model={tiny_model_dir}", "train.compile=false", "eval.samples=0", f"output.dir={runs}", "train.max_steps=2"]
    sft = [f"data.train={write_jsonl(tmp_path / 's.jsonl', sft_rows[:16])}", "train.lr=5e-3"]  # far from the base
    assert main(["train", *base, *sft, "output.name=sft"]) == 0

    train, val = generate(n_train=12, n_val=4, seed=5)
    prefs = [f"data.train={write_jsonl(tmp_path / 't.jsonl', train)}", f"data.val={write_jsonl(tmp_path / 'v.jsonl', val)}"]
    dpo = [*base, *prefs, "train.objective=dpo", "train.lr=1e-3", "train.micro_batch_size=4", f"model.adapter={runs / 'sft'}"]
    assert main(["train", *dpo, "output.name=dpo", "lora.r=4"]) == 0  # lora.* is the SFT adapter's, not this
    before = json.loads((runs / "dpo/eval_before.json").read_text())
    # Policy and reference are the SFT adapter at the start: a zero margin on every pair (the base would not give it).
    assert before["loss"] == pytest.approx(0.6931, abs=1e-4) and before["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    sft_cfg = json.loads((runs / "sft/adapter/adapter_config.json").read_text())
    dpo_cfg = json.loads((runs / "dpo/adapter/adapter_config.json").read_text())
    assert dpo_cfg["r"] == sft_cfg["r"] != 4
    assert not (runs / "dpo/adapter/reference").exists()  # only the trained adapter is saved
    assert main(["merge", str(runs / "dpo"), "--out", str(tmp_path / "merged")]) == 0
    assert not (tmp_path / "merged" / "INCOMPLETE").exists()


def test_a_start_adapter_of_another_base_is_refused_before_loading(tmp_path, tiny_model_dir, capsys):
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "some/other-model"}))
    args = ["train", f"model={tiny_model_dir}", f"model.adapter={adapter}", f"output.dir={tmp_path}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "was trained on some/other-model" in err and "model.name=some/other-model" in err


def test_data_check_names_bad_pairs_and_reports_both_sides(tmp_path, smol_dir, capsys):
    good = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}.", "rejected": f"Well, it is {i + 1}."} for i in range(6)]
    path = write_jsonl(tmp_path / "p.jsonl", [*good, {"prompt": Q, "chosen": "Paris.", "rejected": "Paris."}])
    assert main(["data", "check", str(path), "--model", str(smol_dir), "--report", str(tmp_path / "c.json"), "--no-plot"]) == 2
    out = capsys.readouterr().out
    assert f"{path}:7" in out and "identical" in out
    report = json.loads((tmp_path / "c.json").read_text())
    pairs = report["preference_pairs"]
    assert pairs["pairs"] == 6 and pairs["chosen_longer_share"] == 0.0
    assert pairs["chosen_trained_tokens"]["max"] < pairs["rejected_trained_tokens"]["min"]  # "N." vs the padded answer
    clean = write_jsonl(tmp_path / "ok.jsonl", good)
    assert main(["data", "check", str(clean), "--model", str(smol_dir), "--no-plot"]) == 0
    assert "preference pairs: 6" in capsys.readouterr().out


def test_preference_pairs_under_the_sft_objective_are_refused_naming_the_objective(tmp_path, tiny_model_dir, capsys):
    rows = [{"prompt": Q, "chosen": "Paris.", "rejected": "Lyon."}] * 2
    args = ["train", f"model={tiny_model_dir}", f"data.train={write_jsonl(tmp_path / 'p.jsonl', rows)}", f"output.dir={tmp_path}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "p.jsonl:1" in err and "train.objective=dpo" in err and "Traceback" not in err
