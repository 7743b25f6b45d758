"""What vLLM accepts, read from the adapter's own config."""

import json

from lorasmith.export.compat import vllm_command, vllm_notes


def _adapter(tmp_path, **meta):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 16, "target_modules": ["q_proj", "v_proj"], **meta}))
    return tmp_path


def test_a_plain_adapter_needs_no_note(tmp_path):
    folder = _adapter(tmp_path)
    assert vllm_notes(folder) == []
    assert vllm_command("triage", folder, "HuggingFaceTB/SmolLM2-135M-Instruct").endswith(f"triage={folder}")


def test_what_vllm_refuses_is_named(tmp_path):
    notes = vllm_notes(_adapter(tmp_path, use_dora=True, modules_to_save=["score"], target_modules=["lm_head"], r=64))
    text = " ".join(notes)
    assert len(notes) == 4 and "DoRA" in text and "modules_to_save" in text and "lm_head" in text
    assert "--max-lora-rank 64" in text
