"""The learner's importance-ratio log-probs are float32 even when its forward autocasts to bf16.

Pins (issue 18, item 6: on CUDA the learner's forward autocasts to bf16 while the HF actor samples in
float32, so the on-policy ratio was off by the bf16 rounding of the logits):
- the log-prob functions of the ratio return float32 for bf16 logits (the log-softmax is never bf16);
- a `Trainer`'s model, run under bf16 autocast, returns float32 logits (main: bf16, the head autocast);
  CPU autocast rounds like CUDA's, so this runs here;
- those log-probs are closer to a float32 forward's than a bf16 head's (the measurement in
  `learner/precision.py`);
- the swap changes nothing else: the head is still an `nn.Linear`, state-dict names, weight tying and the
  gradient reaching the head are as before.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from learner.batching import gather_response_logprobs
from learner.config import LearnerConfig
from learner.distributed import Distributed, TrainModel
from learner.precision import Fp32Linear, forward_autocast, fp32_output_head
from learner.step import Trainer
from protocol.sampling import token_logprobs

VOCAB = 1024


def _model(*, tied: bool = False, head_scale: float = 15.0) -> LlamaForCausalLM:
    """A 2-layer Llama whose head is scaled so logits span about +-15, like a trained model's."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    if not tied:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    return model


def _trainer(model: torch.nn.Module) -> Trainer:
    cfg = LearnerConfig.model_validate({"micro_batch_tokens": 1 << 12})
    dist = Distributed()
    return Trainer(cfg, TrainModel(model, dist, fsdp=False), dist, torch.device("cpu"), pad_id=0)


def _logprobs(logits_BTV: torch.Tensor, ids_BT: torch.Tensor) -> torch.Tensor:
    return gather_response_logprobs(logits_BTV, ids_BT)[:, 1:]


def test_ratio_logprobs_are_float32_for_bf16_logits() -> None:
    logits_BTV = torch.randn(2, 5, 11).to(torch.bfloat16)
    ids_BT = torch.randint(0, 11, (2, 5))
    assert gather_response_logprobs(logits_BTV, ids_BT).dtype == torch.float32
    assert gather_response_logprobs(logits_BTV, ids_BT, temperature=0.7, top_p=0.9).dtype == torch.float32
    assert token_logprobs(logits_BTV[0], ids_BT[0], 0.7, 1.0).dtype == torch.float32


def test_a_trainers_model_gives_float32_logits_under_bf16_autocast() -> None:
    model = _model()
    _trainer(model)
    ids_BT = torch.randint(0, VOCAB, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_BTV = model(input_ids=ids_BT).logits
    assert logits_BTV.dtype == torch.float32


def test_the_fp32_head_brings_the_ratio_closer_to_a_float32_forward() -> None:
    bf16_head, fp32_head = _model(), _model()
    fp32_output_head(fp32_head)
    ids_BT = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = _logprobs(bf16_head(input_ids=ids_BT).logits, ids_BT)  # no autocast: float32 throughout
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = _logprobs(bf16_head(input_ids=ids_BT).logits, ids_BT)
            kept = _logprobs(fp32_head(input_ids=ids_BT).logits, ids_BT)
    err_bf16 = (rounded - reference).abs().mean().item()
    err_fp32 = (kept - reference).abs().mean().item()
    assert 0 < err_fp32 < err_bf16, (err_fp32, err_bf16)


def test_the_swap_changes_nothing_else() -> None:
    model = _model(tied=True)
    names = list(model.state_dict())
    assert fp32_output_head(model) and fp32_output_head(model)  # idempotent
    head = model.get_output_embeddings()
    assert type(head) is Fp32Linear and isinstance(head, torch.nn.Linear)
    assert list(model.state_dict()) == names
    assert head.weight is model.get_input_embeddings().weight  # still tied
    ids_BT = torch.randint(0, VOCAB, (2, 8))
    with forward_autocast(torch.device("cpu")):
        model(input_ids=ids_BT).logits.float().logsumexp(-1).sum().backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
