"""`lorasmith export gguf`: GGUF in -> train -> merge -> GGUF out -> load, checked by the command and here."""

import json

import pytest
import torch
from tests.conftest import write_jsonl

from lorasmith.cli import main


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory, tiny_model_dir, demo_rows):
    """A run trained on a GGUF base: the tiny Llama written as GGUF by llama.cpp's own converter."""
    from lorasmith.export.gguf import _convert

    folder = tmp_path_factory.mktemp("gguf")
    base = folder / "tiny.gguf"
    _convert("convert_hf_to_gguf.py", [str(tiny_model_dir), "--outfile", str(base), "--outtype", "f32"])
    train, _ = demo_rows
    data = write_jsonl(folder / "train.jsonl", train[:16])
    args = ["train", f"model.name={base}", f"data.train={data}", f"output.dir={folder}", "output.name=run"]
    assert main([*args, "train.max_steps=3", "train.lr=1e-2", "eval.samples=2", "train.precision=fp32"]) == 0
    return folder / "run"


def test_gguf_round_trip(gguf_run, tmp_path, capsys):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model.gguf"
    assert main(["export", "gguf", str(gguf_run), "--out", str(out), "--type", "f16"]) == 0
    printed = capsys.readouterr().out
    assert "checked in llama.cpp" in printed and "greedy answers identical: 6 of 6" in printed
    manifest = json.loads((tmp_path / "model.gguf.manifest.json").read_text())
    checks = manifest["checks"]
    assert manifest["passed"] and checks["logits"]["top1_agreement"] >= 0.99
    assert checks["prompt_tokens"]["identical"] == checks["prompt_tokens"]["of"] == 6  # 4 probes + the run's 2 samples
    assert checks["stop_tokens"]["passed"] and checks["perplexity"]["ratio"] < 1.01
    # Read back here too, independently of the command: the template travels, and the weights are the
    # adapter's (merged), not the base's.
    reader = GGUFReader(str(out))
    tokenizer = AutoTokenizer.from_pretrained(gguf_run / "adapter")
    assert reader.get_field("tokenizer.chat_template").contents() == tokenizer.chat_template
    assert reader.get_field("general.base_model.0.name").contents().endswith("tiny.gguf")  # the base it was trained on
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    from peft import PeftModel

    from lorasmith.config import ModelConfig
    from lorasmith.models.loading import load_model

    config = (gguf_run / "config.yaml").read_text()
    base_name = next(line.split(": ", 1)[1] for line in config.splitlines() if line.strip().startswith("name:"))
    base = load_model(ModelConfig(name=base_name.strip()), device=torch.device("cpu"), attn_implementation="sdpa")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, gguf_run / "adapter").eval()(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert (got - tuned).abs().max() < 0.05 < (tuned - plain).abs().max()  # f16 rounding vs what training changed


def test_lora_gguf_for_llama_cpp(gguf_run, tmp_path):
    """The adapter alone, applied by llama.cpp (--lora) on the GGUF base the run trained on, answers as the
    merged model does."""
    out = tmp_path / "lora.gguf"
    assert main(["export", "gguf", str(gguf_run), "--out", str(out), "--adapter-only"]) == 0
    manifest = json.loads((tmp_path / "lora.gguf.manifest.json").read_text())
    checks = manifest["checks"]
    assert manifest["passed"] and checks["tensors"]["written"] > 0
    assert checks["with_base.runtime"]["lora"].endswith("lora.gguf.incomplete")  # checked before it was renamed
    assert checks["with_base.logits"]["top1_agreement"] >= 0.999 and checks["with_base.greedy_answers"]["identical"] == 6


def test_default_export_is_q4_k_m_checked_in_llama_cpp(gguf_run, tmp_path, capsys):
    from gguf import GGUFReader

    out = tmp_path / "model.gguf"
    assert main(["export", "gguf", str(gguf_run), "--out", str(out), "--keep-intermediate"]) == 0
    printed = capsys.readouterr().out
    assert "as q4_k_m GGUF" in printed and "perplexity ratio" in printed and "f16 verified" in printed
    manifest = json.loads((tmp_path / "model.gguf.manifest.json").read_text())
    assert manifest["type"] == "q4_k_m" and [t["type"] for t in manifest["checks"]["auto"]["tried"]] == ["f16", "q4_k_m"]
    assert manifest["checks"]["perplexity"]["ratio"] <= gguf_tolerance("q4_k_m").perplexity
    assert GGUFReader(str(out)).get_field("general.file_type").contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert (tmp_path / "model.f16.gguf").is_file() and out.stat().st_size < (tmp_path / "model.f16.gguf").stat().st_size
    modelfile = (tmp_path / "model.Modelfile").read_text()  # for `ollama create NAME -f model.Modelfile`
    assert modelfile.startswith("FROM ./model.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert manifest["checks"]["ollama"]["identical_renderings"] == 4 and "Ollama:" in printed


def gguf_tolerance(kind):
    from lorasmith.export.gguf_verify import TOLERANCE

    return TOLERANCE[kind]


def test_a_failed_check_exits_1_and_leaves_no_gguf(gguf_run, tmp_path, monkeypatch, capsys):
    from lorasmith.export import gguf_verify

    impossible = gguf_verify.Tolerance(1.01, 0.0, 1.0, 1.0, 1.0)  # top-1 agreement above 100%
    monkeypatch.setitem(gguf_verify.TOLERANCE, "f16", impossible)
    out = tmp_path / "model.gguf"
    assert main(["export", "gguf", str(gguf_run), "--out", str(out), "--type", "f16"]) == 1
    assert not out.exists() and (tmp_path / "model.gguf.incomplete").is_file()
    assert "verification failed" in capsys.readouterr().out
    assert not json.loads((tmp_path / "model.gguf.manifest.json").read_text())["passed"]


def test_without_llama_cpp_auto_is_16_bit_read_back_by_transformers(gguf_run, tmp_path, monkeypatch, capsys):
    """Where llama-cpp-python could not be built: --type auto writes the verified 16-bit file, checked by
    transformers' GGUF reader; a quantized type asks for the gguf extra (exit 2, nothing written)."""
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` fails, as where it is not installed
    out = tmp_path / "model.gguf"
    assert main(["export", "gguf", str(gguf_run), "--out", str(out)]) == 0
    manifest = json.loads((tmp_path / "model.gguf.manifest.json").read_text())
    assert manifest["passed"] and manifest["type"] == "f16" and "runtime" not in manifest["checks"]
    assert manifest["checks"]["logits"]["top1_agreement"] >= 0.99 and manifest["checks"]["greedy_answers"]["identical"] == 4
    capsys.readouterr()
    assert main(["export", "gguf", str(gguf_run), "--out", str(tmp_path / "q.gguf"), "--type", "q4_k_m"]) == 2
    assert "lorasmith[gguf]" in capsys.readouterr().err and not (tmp_path / "q.gguf").exists()


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, tokenizer):
    """A tiny Gemma-3 (its norms' +1 offset, scaled embeddings, sliding-window layers, a Gemma chat template)
    whose first MLP, like the real Gemma-3's, pushes activations past f16's 65504: llama.cpp multiplies f16
    weights by f16-rounded activations, so an f16 file of it computes inf, while fp32 and bf16 hold."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,  # rows that divide into k-quant blocks of 256: real Q4_K tensors
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        query_pre_attn_scalar=64,  # llama.cpp scales attention by 1/sqrt(head_dim), as the released Gemma-3s do
        sliding_window=16,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(5)  # decisive logits rather than the near-uniform ones of a fresh init
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight.mul_(150)
        mlp.up_proj.weight.mul_(150)
        seen = {}

        def largest_input(module, args, out):
            seen["max"] = float(args[0].abs().max())

        hook = mlp.down_proj.register_forward_hook(largest_input)
        ids = tokenizer("hello there, how are you today?", return_tensors="pt")["input_ids"]
        model(input_ids=ids)
        hook.remove()
    assert seen["max"] > 65504  # what the test is about
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    meta = json.loads(config_path.read_text())
    meta["chat_template"] = GEMMA_TEMPLATE
    config_path.write_text(json.dumps(meta))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def test_gemma_shaped_model_f16_fails_in_llama_cpp_and_auto_quantizes_from_bf16(gemma_dir, tmp_path, capsys):
    """The Gemma-3 f16 failure, as llama.cpp runs the file: f16 computes inf there (caught: NaN logits), so
    --type auto makes its q4_k_m from the bf16 file, which verifies."""
    from gguf import GGUFReader

    out = tmp_path / "gemma.gguf"
    assert main(["export", "gguf", str(gemma_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "f16 did not verify" in printed and "bf16 verified" in printed and "as q4_k_m GGUF" in printed
    manifest = json.loads((tmp_path / "gemma.gguf.manifest.json").read_text())
    tried = manifest["checks"]["auto"]["tried"]
    assert [(t["type"], t["passed"]) for t in tried] == [("f16", False), ("bf16", True), ("q4_k_m", True)]
    reader = GGUFReader(str(out))
    assert reader.get_field("general.architecture").contents() == "gemma3"
    assert reader.get_field("tokenizer.chat_template").contents() == GEMMA_TEMPLATE
    assert "Q4_K" in {t.tensor_type.name for t in reader.tensors}
    assert manifest["checks"]["prompt_tokens"]["passed"] and manifest["checks"]["perplexity"]["ratio"] < 1.15
