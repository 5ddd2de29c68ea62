"""The README's Python snippets run as written, on the CPU.

Each ```python block of README.md runs in a fresh namespace, in a directory that holds what the
snippets name: a tiny random Qwen3-MoE checkpoint with a small tokenizer at the path of the real
model's id, and PEFT adapters under ``adapters/`` of the ranks the README describes. The only
change to the text is ``"cuda"`` -> ``"cpu"``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from utils import COMMON, TINY

README = Path(__file__).resolve().parent.parent / "README.md"
MODEL_ID = "Qwen/Qwen3-30B-A3B"
# The tests' tiny Qwen3-MoE, with the special token ids its tokenizer has.
CHECKPOINT_CONFIG = {**COMMON, **TINY["qwen3_moe"][1], "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}
# The adapters the README loads, with the ranks its text gives them.
ADAPTER_RANKS = {"sql": 8, "chat": 4, "math": 16}


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def save_tiny_checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(**CHECKPOINT_CONFIG))
    model.save_pretrained(path)
    words = ["[PAD]", "[EOS]", "[UNK]", "SELECT", "Hello", "Hi", "from", "the", "table"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )
    tokenizer.save_pretrained(path)
    for name, rank in ADAPTER_RANKS.items():
        peft_model = get_peft_model(
            transformers.AutoModelForCausalLM.from_pretrained(path),
            LoraConfig(
                r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
                target_parameters=["experts.gate_up_proj", "experts.down_proj"],
            ),
        )  # fmt: skip
        peft_model.save_pretrained(path.parent.parent / "adapters" / name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    save_tiny_checkpoint(root / MODEL_ID)
    return root


def test_readme_has_snippets():
    assert len(snippets()) >= 2


@pytest.mark.parametrize("index", range(len(snippets())))
def test_snippet_runs(index, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    code = snippets()[index].replace('"cuda"', '"cpu"')
    print(code)
    exec(compile(code, f"README.md snippet {index}", "exec"), {"__name__": f"readme_snippet_{index}"})
