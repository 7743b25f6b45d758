import pytest
import torch
from tests.conftest import tiny_lora

from lorasmith.data.batching import collate, plan_epoch
from lorasmith.data.masking import encode
from lorasmith.models.hardware import Precision
from lorasmith.models.loss import weighted_loss
from lorasmith.training.step import accumulate_gradients

FP32 = Precision("fp32", "cpu")


@pytest.fixture
def lora_model(tiny_model_dir):
    return tiny_lora(tiny_model_dir)


@pytest.fixture
def encoded(tokenizer, demo_rows):
    train, _ = demo_rows
    return [encode(tokenizer, r["messages"], max_length=256) for r in train[:8]]


def test_plan_is_a_deterministic_partition():
    lengths = [5, 50, 7, 90, 12, 33, 64, 3, 8, 41]
    for order in ("length", "shuffle", "curriculum"):
        a = plan_epoch(lengths, 3, seed=1, epoch=0, order=order)
        assert a == plan_epoch(lengths, 3, seed=1, epoch=0, order=order)
        assert sorted(i for b in a for i in b) == list(range(10))
        assert a != plan_epoch(lengths, 3, seed=1, epoch=1, order=order) or order == "curriculum"
    curriculum = [lengths[i] for b in plan_epoch(lengths, 3, 1, 0, "curriculum") for i in b]
    assert curriculum == sorted(lengths)
    grouped = plan_epoch(lengths, 2, seed=1, epoch=0, order="length")
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in grouped)
    shuffled = plan_epoch(lengths, 2, seed=1, epoch=0, order="shuffle")
    assert padding <= sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in shuffled)


def test_labelled_positions_loss_equals_full_logits_loss(lora_model, encoded, tokenizer):
    batch = collate(encoded[:4], tokenizer.pad_token_id)
    parts = weighted_loss(lora_model, batch, FP32)
    labels = torch.where(batch.weights > 0, batch.input_ids, torch.full_like(batch.input_ids, -100))
    with torch.no_grad():
        reference = lora_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
    assert float(parts.loss_sum.detach()) / parts.weight_sum == pytest.approx(float(reference), rel=1e-5)
    assert parts.positions == int((batch.weights[:, 1:] > 0).sum())


def test_training_steps_skip_the_argmax_that_evaluation_counts(lora_model, encoded, tokenizer):
    batch = collate(encoded[:4], tokenizer.pad_token_id)
    assert weighted_loss(lora_model.train(), batch, FP32).correct is None  # nothing reads it there
    with torch.no_grad():
        parts = weighted_loss(lora_model.eval(), batch, FP32)
        logits = lora_model(input_ids=batch.input_ids).logits[:, :-1]
    keep = batch.weights[:, 1:] > 0
    assert parts.correct == int((logits.argmax(-1) == batch.input_ids[:, 1:])[keep].sum())


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_and_gradients_do_not_depend_on_how_the_batch_is_split(lora_model, encoded, tokenizer):
    pad = tokenizer.pad_token_id
    one = accumulate_gradients(lora_model, [collate(encoded, pad)], FP32)
    g_one = _grads(lora_model)
    lora_model.zero_grad(set_to_none=True)
    eight = accumulate_gradients(lora_model, [collate([e], pad) for e in encoded], FP32)
    g_eight = _grads(lora_model)
    assert one == pytest.approx(eight, rel=1e-5)
    for name in g_one:
        torch.testing.assert_close(g_one[name], g_eight[name], rtol=1e-4, atol=1e-7)


def test_bf16_loss_is_close_to_fp32(lora_model, encoded, tokenizer):
    batch = collate(encoded[:4], tokenizer.pad_token_id)
    with torch.no_grad():
        fp32 = weighted_loss(lora_model, batch, FP32)
        bf16 = weighted_loss(lora_model, batch, Precision("bf16", "cpu"))
    assert float(bf16.loss_sum) / bf16.weight_sum == pytest.approx(float(fp32.loss_sum) / fp32.weight_sum, rel=2e-2)


def test_token_cap_pieces_are_a_partition_within_the_cap():
    from lorasmith.training.memory import cap_tokens

    lengths = [100, 30, 250, 40, 90, 10, 60, 300]
    pieces = cap_tokens([list(range(8))], lengths, max_tokens=300)
    assert sorted(i for p in pieces for i in p) == list(range(8))
    assert all(len(p) * max(lengths[i] for i in p) <= 300 or len(p) == 1 for p in pieces)
    assert cap_tokens([[0, 1]], lengths, 0) == [[0, 1]]
    # Near-equal parts, no one-row remainder: 7 rows of 290 fit under 2048, but 4 + 4 is what runs.
    assert [len(p) for p in cap_tokens([list(range(8))], [290] * 8, 2048)] == [4, 4]
    assert [len(p) for p in cap_tokens([list(range(8))], [600] + [100] * 7, 1000)] == [1, 7]
    assert [len(p) for p in cap_tokens([list(range(9))], [200] * 9, 1000)] == [5, 4]
    # Rows padded to a multiple of 16 (train.pad_to_multiple_of) are as wide as their rounded length: 5 x 208 > 1000.
    assert [len(p) for p in cap_tokens([list(range(9))], [200] * 9, 1000, multiple=16)] == [3, 3, 3]
    assert [len(p) for p in cap_tokens([list(range(9))], [200] * 9, 1000, multiple=16, limit=200)] == [5, 4]  # not past it


def _run(tiny_model_dir, tmp_path, demo_rows, name, *extra):
    import json

    from tests.conftest import write_jsonl

    from lorasmith.cli import main

    train, val = demo_rows
    t, v = write_jsonl(tmp_path / "t.jsonl", train), write_jsonl(tmp_path / "v.jsonl", val)
    args = [
        "train",
        f"model.name={tiny_model_dir}",
        f"data.train={t}",
        f"data.val={v}",
        f"output.dir={tmp_path}",
        f"output.name={name}",
        "train.max_steps=4",
        "train.lr=5e-3",
        "eval.samples=0",
        *extra,
    ]
    assert main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], json.loads((tmp_path / name / "eval_after.json").read_text())["loss"]


def test_token_cap_does_not_change_the_result(tmp_path, tiny_model_dir, demo_rows):
    capped, _ = _run(tiny_model_dir, tmp_path, demo_rows, "capped", "train.precision=fp32", "train.max_batch_tokens=300")
    whole, _ = _run(tiny_model_dir, tmp_path, demo_rows, "whole", "train.precision=fp32", "train.max_batch_tokens=0")
    assert capped == pytest.approx(whole, rel=1e-5)


def test_bf16_base_weights_match_fp32_eval_loss(tmp_path, tiny_model_dir, demo_rows):
    _, bf16 = _run(tiny_model_dir, tmp_path, demo_rows, "bf16", "train.precision=bf16", "train.base_dtype=bf16")
    _, fp32 = _run(tiny_model_dir, tmp_path, demo_rows, "fp32", "train.precision=fp32")
    assert bf16 == pytest.approx(fp32, rel=1e-2)


def test_packed_rows_match_separate_sequences(lora_model, encoded, tokenizer):
    """Padding-free packing: per-sample logits and the loss equal the unpacked ones (no attention across samples)."""
    from lorasmith.data.batching import collate_packed
    from lorasmith.models.loss import causal_lm

    samples = encoded[:3]
    packed = collate_packed(samples)
    lm = causal_lm(lora_model)
    with torch.no_grad():
        whole = lm(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits[0]
        start = 0
        for s in samples:
            alone = lm(input_ids=torch.tensor([s.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(whole[start : start + len(s.input_ids)], alone, rtol=1e-4, atol=1e-4)
            start += len(s.input_ids)
        a = weighted_loss(lora_model, packed, FP32)
        b = weighted_loss(lora_model, collate(samples, tokenizer.pad_token_id), FP32)
    assert a.weight_sum == b.weight_sum
    assert float(a.loss_sum) == pytest.approx(float(b.loss_sum), rel=1e-5)


def test_token_budget_plan_fills_batches_and_keeps_the_step_count():
    from lorasmith.data.batching import token_budget_plan

    lengths = [30, 200, 45, 120, 800, 60, 33, 90, 150, 41, 77, 300]
    plans = [token_budget_plan(lengths, 400, seed=3, epoch=e) for e in range(3)]
    for plan in plans:
        assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
        assert all(len(b) * max(lengths[i] for i in b) <= 400 or len(b) == 1 for b in plan)
    assert len({len(p) for p in plans}) == 1  # same number of steps every epoch
    assert sorted(map(sorted, plans[0])) == sorted(map(sorted, plans[1]))  # same buckets ...
    assert plans[0] != plans[1]  # ... in another order
    short = next(b for b in plans[0] if 0 in b)
    assert len(short) > 1  # short conversations share a batch


def test_token_budget_training_runs(tmp_path, tiny_model_dir, demo_rows):
    losses, _ = _run(tiny_model_dir, tmp_path, demo_rows, "budget", "train.micro_batch_tokens=600", "train.precision=fp32")
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_compiled_decoder_layers_give_the_same_training(tmp_path, tiny_model_dir, demo_rows):
    """train.compile: same per-step losses and eval loss as eager (evaluation itself runs eagerly)."""
    from torch._dynamo.utils import counters

    counters.clear()
    compiled, c_eval = _run(tiny_model_dir, tmp_path, demo_rows, "compiled", "train.precision=fp32", "train.compile=true")
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled path really ran
    eager, e_eval = _run(tiny_model_dir, tmp_path, demo_rows, "eager", "train.precision=fp32")
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert c_eval == pytest.approx(e_eval, rel=1e-4)


def test_compile_auto_decides_by_device_size_and_quantization(tiny_model_dir, monkeypatch):
    from tests.conftest import tiny_lora

    import lorasmith.training.compile as compile_mod

    model, cpu = tiny_lora(tiny_model_dir), torch.device("cpu")
    assert compile_mod.should_compile(True, model, cpu, quantized=False)[0] is True
    assert compile_mod.should_compile(False, model, cpu, quantized=False)[0] is False
    on, why = compile_mod.should_compile("auto", model, cpu, quantized=False)
    assert not on and "too small" in why  # the tiny test model stays eager
    monkeypatch.setattr(compile_mod, "MIN_PARAMETERS", 0)
    monkeypatch.setattr(compile_mod, "cpp_compiler", lambda: "/usr/bin/g++")
    assert compile_mod.should_compile("auto", model, cpu, quantized=False)[0] is True
    assert compile_mod.should_compile("auto", model, torch.device("cuda"), quantized=False)[0] is False
    assert compile_mod.should_compile("auto", model, cpu, quantized=True)[0] is False
    monkeypatch.setattr(compile_mod, "cpp_compiler", lambda: None)
    assert "no C++ compiler" in compile_mod.should_compile("auto", model, cpu, quantized=False)[1]


def test_a_compiler_failure_falls_back_to_eager(tiny_model_dir, monkeypatch, caplog):
    """No C++ compiler or Python headers at run time: training goes on eagerly, with a warning."""
    from tests.conftest import tiny_lora

    import lorasmith.training.compile as compile_mod

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise torch._dynamo.exc.TorchDynamoException("C++ compile error: Python.h: No such file")

        return run

    ids = torch.tensor([[1, 5, 9, 14, 2, 7]])
    eager = tiny_lora(tiny_model_dir).train()
    want = compile_mod.causal_lm(eager)(input_ids=ids).logits
    model = tiny_lora(tiny_model_dir).train()
    monkeypatch.setattr(torch, "compile", broken_compile)
    compile_mod.compile_decoder_layers(model)
    with caplog.at_level("WARNING", logger="lorasmith"):
        got = compile_mod.causal_lm(model)(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert "training on eagerly" in caplog.text


def test_a_cpp_wrapper_failure_compiles_with_the_python_wrapper(tiny_model_dir, monkeypatch, caplog):
    """Inductor's C++ wrapper failing to build: every compiled function of the model is compiled again with the
    Python wrapper (one failure is enough), and training stays compiled."""
    from tests.conftest import tiny_lora

    import lorasmith.training.compile as compile_mod

    attempts = []

    def compile_without_cpp_wrapper(fn, **kwargs):
        wrapper = "C++" if kwargs.get("options", {}).get("cpp_wrapper") else "Python"

        def run(*args, **kw):
            attempts.append(wrapper)
            if wrapper == "C++":
                raise torch._dynamo.exc.TorchDynamoException("C++ compile error: wrapper.cpp: error")
            return fn(*args, **kw)

        return run

    ids = torch.tensor([[1, 5, 9, 14, 2, 7]])
    want = _logit_grads(tiny_lora(tiny_model_dir).train(), ids)
    model = tiny_lora(tiny_model_dir).train()
    monkeypatch.setattr(compile_mod, "wrapper_options", lambda model: {"cpp_wrapper": True})
    monkeypatch.setattr(torch, "compile", compile_without_cpp_wrapper)
    compile_mod.compile_decoder_layers(model)
    with caplog.at_level("WARNING", logger="lorasmith"):
        got = _logit_grads(model, ids)
    assert attempts == ["C++", "Python", "Python"]  # the second layer never tries the C++ wrapper
    assert "compiling with its Python wrapper" in caplog.text and "training on eagerly" not in caplog.text
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def _logit_grads(model, ids) -> dict:
    """The trainable parameters' gradients of a simple function of the logits (mean of their squares)."""
    from lorasmith.models.loss import causal_lm

    causal_lm(model)(input_ids=ids).logits.float().pow(2).mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(got: dict, want: dict) -> None:
    """The same parameters, each gradient within fp32 summation-order differences."""
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_every_lora_layer_trains_through_the_compiled_graph_the_first_too(tiny_model_dir, monkeypatch):
    """The first layer's input (the frozen embedding's output) needs no gradient: it is given one that asks
    for it, so that layer runs the compiled graph like the others, with the eager gradients; evaluation and
    layers with nothing to train stay eager."""
    from tests.conftest import tiny_lora

    import lorasmith.training.compile as compile_mod

    ran = []
    original = compile_mod._Fallback.__call__
    monkeypatch.setattr(compile_mod._Fallback, "__call__", lambda self, *a, **k: ran.append(self) or original(self, *a, **k))
    ids = torch.tensor([[1, 5, 9, 14, 2, 7]])

    want = _logit_grads(tiny_lora(tiny_model_dir).train(), ids)
    model = tiny_lora(tiny_model_dir).train()
    layers = compile_mod.compile_decoder_layers(model)
    got = _logit_grads(model, ids)
    assert len(set(ran)) == layers == 2  # each layer's forward went through its compiled function
    assert_same_grads(got, want)
    ran.clear()
    with torch.no_grad():
        compile_mod.causal_lm(model.eval())(input_ids=ids)
        compile_mod.causal_lm(model.train())(input_ids=ids)
    frozen = tiny_lora(tiny_model_dir).train().requires_grad_(False)  # nothing to train when compiled
    compile_mod.compile_decoder_layers(frozen)
    compile_mod.causal_lm(frozen)(input_ids=ids)
    assert not ran


def test_compiled_layers_under_gradient_checkpointing_give_eager_gradients(tiny_model_dir):
    """train.gradient_checkpointing with compiled layers (the first one's input asking for a gradient inside
    the checkpointed region): the same gradients as eager layers without checkpointing."""
    from tests.conftest import tiny_lora

    import lorasmith.training.compile as compile_mod

    ids = torch.tensor([[1, 5, 9, 14, 2, 7], [3, 8, 4, 4, 11, 6]])

    want = _logit_grads(tiny_lora(tiny_model_dir).train(), ids)
    model = tiny_lora(tiny_model_dir).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as trainee.py
    compile_mod.compile_decoder_layers(model)
    got = _logit_grads(model, ids)
    assert_same_grads(got, want)


def test_compiled_packed_rows_still_do_not_attend_across_samples(tiny_model_dir, encoded, tokenizer):
    """The packing mask is built outside the compiled layers: compiled, a packed row's loss and
    gradients still equal those of its samples padded side by side."""
    from lorasmith.data.batching import collate_packed
    from lorasmith.training.compile import compile_decoder_layers

    model = tiny_lora(tiny_model_dir).train()
    compile_decoder_layers(model)
    results = []
    for batch in (collate_packed(encoded[:3]), collate(encoded[:3], tokenizer.pad_token_id)):
        model.zero_grad(set_to_none=True)
        parts = weighted_loss(model, batch, FP32)
        parts.loss_sum.backward()
        results.append(
            (float(parts.loss_sum.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        )
    (packed, g_packed), (padded, g_padded) = results
    assert packed == pytest.approx(padded, rel=1e-5)
    for name, g in g_packed.items():
        torch.testing.assert_close(g, g_padded[name], rtol=1e-4, atol=1e-6)


def test_batched_generation_keeps_each_answer_with_its_prompt(smol_dir, tokenizer):
    """Prompts are batched by length (sorted), and answers come back in the callers' order."""
    from lorasmith.config import ModelConfig
    from lorasmith.evaluation.generate import generate
    from lorasmith.models.hardware import Precision
    from lorasmith.models.loading import load_model

    model = load_model(ModelConfig(name=str(smol_dir)), device=torch.device("cpu"), attn_implementation="sdpa")
    questions = [
        "Name a colour.",
        "What is 2+2? Answer with a number only, no words at all please.",
        "Say hi.",
        "Spell 'cat' backwards, then explain in one long sentence why spelling backwards is fun.",
        "Capital of Peru?",
    ]
    histories = [[{"role": "user", "content": q}] for q in questions]
    fp32 = Precision("fp32", "cpu")
    batched = generate(model, tokenizer, histories, precision=fp32, max_new_tokens=6, batch_size=4)
    one_by_one = [generate(model, tokenizer, [h], precision=fp32, max_new_tokens=6)[0] for h in histories]
    assert batched == one_by_one and len(set(batched)) > 1


def test_auto_token_cap_follows_the_measured_rate_and_the_memory(lora_model, encoded, tiny_model_dir, monkeypatch):
    """train.max_batch_tokens=auto: the probe's knee, as far as the memory budget holds it (a real forward and
    backward measures the memory), never below 2048, and nothing measured where no micro-batch can pass 2048."""
    from types import SimpleNamespace

    from lorasmith import config
    from lorasmith.distributed import Dist
    from lorasmith.training import phases

    probed = []

    def knee(shapes, precision):
        probed.append(precision)
        return SimpleNamespace(chosen="8192", gflops={"2048": 1036.0, "4096": 1490.0, "8192": 1804.0})

    monkeypatch.setattr(phases, "probe_batch_tokens", knee)
    parallel = SimpleNamespace(dist=Dist(), precision=Precision("bf16", "cpu"), model=lora_model.train())
    lengths = [len(e.input_ids) for e in encoded]
    cpu = torch.device("cpu")

    def cap(micro_batch: int, *overrides: str) -> int:
        cfg = config.load(None, [f"model.name={tiny_model_dir}", *overrides])
        plan = SimpleNamespace(lengths=lengths, plan_mb=micro_batch)
        return phases.batch_token_cap(cfg, parallel, SimpleNamespace(encoded=encoded), plan, 0, cpu)

    assert 2 * max(lengths) <= 2048 < 64 * max(lengths)
    assert cap(2) == 2048 and not probed  # cannot bind: not measured
    assert cap(64, "train.memory_budget_gb=100") == 8192 and probed == ["bf16"]
    assert cap(64, "train.memory_budget_gb=0.0001") == 2048  # 100 KiB hold fewer than 2048 tokens: the floor
    assert cap(64, "train.max_batch_tokens=300") == 300 and cap(64, "train.max_batch_tokens=0") == 0
