"""learner/weightfiles.py: after the first publication only the tensors are serialised, and what is written
is what ``save_pretrained`` would have written (same files, same config and tokenizer bytes, the current weights).

Pinned here:
- a kept ``WeightWriter`` calls ``save_pretrained`` once; later versions hold the same file names, the same
  non-tensor bytes, and tensors equal to the model's *current* weights as ``from_pretrained`` loads them,
  tied embeddings included;
- a model whose saved tensors are not its ``state_dict``'s (renamed) falls back to ``save_pretrained`` every time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models

from learner import weightfiles
from learner.publish import publish_weights
from learner.weightfiles import WeightWriter


def tiny(tied: bool) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied))


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "a": 1, "b": 2}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]")), unk_token="[UNK]")


@pytest.fixture()
def full_saves(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The dirs the real ``save_model`` (``save_pretrained``) wrote, in order."""
    calls: list[Path] = []
    real = weightfiles.save_model

    def counting(model: Any, directory: Path) -> None:
        calls.append(directory)
        real(model, directory)

    monkeypatch.setattr(weightfiles, "save_model", counting)
    return calls


@pytest.mark.parametrize("tied", [False, True])
def test_later_versions_write_only_tensors_and_match_save_pretrained(tmp_path: Path, full_saves: list[Path],
                                                                     tied: bool) -> None:
    model, tok, writer = tiny(tied), tokenizer(), WeightWriter()
    first, _ = publish_weights(model, tmp_path / "w", 1, 3, tokenizer=tok, writer=writer)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    second, nbytes = publish_weights(model, tmp_path / "w", 2, 3, tokenizer=tok, writer=writer)
    assert len(full_saves) == 1 and writer.static is not None
    reference = tmp_path / "reference"
    reference.mkdir()
    model.save_pretrained(reference)
    tok.save_pretrained(reference)
    files = sorted(p.name for p in second.iterdir())
    assert files == sorted(p.name for p in reference.iterdir()) == sorted(p.name for p in first.iterdir())
    for name in files:
        if not name.endswith(".safetensors"):
            assert (second / name).read_bytes() == (reference / name).read_bytes(), name
    assert nbytes == sum(p.stat().st_size for p in second.iterdir())
    loaded = transformers.LlamaForCausalLM.from_pretrained(second)
    assert set(loaded.state_dict()) == set(model.state_dict())
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert not torch.equal(transformers.LlamaForCausalLM.from_pretrained(first).lm_head.weight, model.lm_head.weight)


class Renamed:
    """Saves like the model, but its ``state_dict`` names the tensors differently: the fast path cannot apply."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> Any:
        return self.model.save_pretrained(save_directory, **kwargs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"renamed.{k}": v for k, v in self.model.state_dict().items()}


def test_a_layout_it_cannot_reproduce_keeps_save_pretrained(tmp_path: Path, full_saves: list[Path]) -> None:
    writer = WeightWriter()
    for version in (1, 2, 3):
        publish_weights(Renamed(tiny(False)), tmp_path, version, 2, writer=writer)  # type: ignore[arg-type]
    assert len(full_saves) == 3 and not writer.fast
