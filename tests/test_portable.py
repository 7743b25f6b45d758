"""An adapter trained on the embedded model names its base by the hub id, and plain peft loads it by that
name: here with a Hugging Face cache standing in for the Hub (offline), as it would on any machine."""

import json
import os
import subprocess
import sys

import pytest
from tests.conftest import write_jsonl

from lorasmith.cli import main

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_plain_peft_loads_the_adapter_by_its_hub_id(tmp_path, smol_dir, demo_rows):
    train, _ = demo_rows
    data = write_jsonl(tmp_path / "t.jsonl", train[:8])
    args = ["train", f"data.train={data}", f"output.dir={tmp_path}", "output.name=run", "train.max_steps=1", "eval.samples=0"]
    assert main([*args, "train.lr=1e-2", "train.compile=false"]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    # A Hugging Face cache holding the base under its hub id (the layout `hf download` leaves).
    repo = tmp_path / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in smol_dir.iterdir():
        if f.is_file() and not f.name.startswith("lorasmith"):
            (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    script = f"""
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
model = AutoPeftModelForCausalLM.from_pretrained({str(adapter)!r}, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained({str(adapter)!r})
assert model.peft_config["default"].base_model_name_or_path == {HUB_ID!r}
ids = tok.apply_chat_template([{{"role": "user", "content": "hi"}}], add_generation_prompt=True, return_tensors="pt")
ids = ids["input_ids"] if hasattr(ids, "keys") else ids
with torch.no_grad():
    tuned = model(input_ids=ids).logits
    with model.disable_adapter():
        plain = model(input_ids=ids).logits
print(float((tuned - plain).abs().max()))
"""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) > 0  # the adapter was applied, not just the base loaded
