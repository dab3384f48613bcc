"""One prompt encoding everywhere, following the tokenizer's own BOS convention (issue 8, defect 4).

Pinned, on real tokenizers saved and reloaded as Hugging Face directories next to the tiny models:
- a tokenizer that does not add BOS by convention (GPT-2 style: `tokenizer(text)` adds nothing) gets
  no BOS; one that adds it (Llama style) gets it; `actor.add_bos` overrides either way; a chat
  template decides the BOS itself unless overridden;
- the real actor, the real `opd cache warm` and the real held-out evaluator produce identical ids for
  the same prompt file, with and without a chat template (warm's entries are full cache hits for
  exactly the actor's ids, and misses for the ids with the BOS toggled);
- settings a tokenizer cannot honour, and an evaluator told to encode differently, fail naming the key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from tokenizers import processors
from transformers import AutoTokenizer

from actors.actor import Actor
from cache.scorers.hf import HFTeacherScorer
from cache.teacher import open_cache
from learner.evaluate import HeldoutEvaluator
from opd import cli as opd_cli
from opd.config import ConfigError, OPDConfig, load_config
from opd.tiny import BOS_ID, asset_paths, build_tokenizer
from protocol.names import Names
from protocol.prompts import PromptFormat, encode_prompt, tokenizer_adds_bos

pytestmark = pytest.mark.integration

VARIANTS = ("bos_convention", "no_bos_convention", "chat_template")
TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }};{% endfor %}{% if add_generation_prompt %}={% endif %}"
PROMPTS = ["up 1 2:", "down c b:", "up 3 5 7:"]


def save_variant(tiny_assets: Path, root: Path, variant: str) -> tuple[Path, Path]:
    """Copies of the tiny student and teacher whose (shared) tokenizer follows `variant`'s convention."""
    tok = build_tokenizer()  # Llama style: its post-processor puts <bos> in front
    if variant == "no_bos_convention":  # GPT-2 style: a BOS token exists, `tokenizer(text)` does not add it
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    if variant == "chat_template":
        tok.chat_template = TEMPLATE
    paths = asset_paths(tiny_assets)
    out = []
    for name, src in (("student", paths.student_dir), ("teacher", paths.teacher_dir)):
        dst = root / variant / name
        shutil.copytree(src, dst)
        tok.save_pretrained(dst)
        out.append(dst)
    return out[0], out[1]


@pytest.fixture(scope="module")
def variants(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("variants")
    return {v: save_variant(tiny_assets, root, v) for v in VARIANTS}


def plain(tok, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("add_bos", [None, True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_bos_follows_the_tokenizer_unless_overridden(
    variants: dict[str, tuple[Path, Path]], variant: str, add_bos: bool | None
) -> None:
    tok = AutoTokenizer.from_pretrained(variants[variant][0])  # the convention survives save + reload
    text = "up 1 2:"
    if variant == "chat_template":
        body = [*plain(tok, text), *plain(tok, ";=")]
        convention = True  # the template writes {{ bos_token }}
    else:
        body = plain(tok, text)
        convention = variant == "bos_convention"
        assert tokenizer_adds_bos(tok) is convention
        assert (tok(text)["input_ids"][:1] == [BOS_ID]) is convention
    want_bos = convention if add_bos is None else add_bos
    expected = [BOS_ID, *body] if want_bos else body
    assert encode_prompt(tok, text, PromptFormat(add_bos=add_bos)) == expected


def test_a_setting_the_tokenizer_cannot_honour_names_the_key(variants: dict[str, tuple[Path, Path]]) -> None:
    tok = AutoTokenizer.from_pretrained(variants["no_bos_convention"][0])
    with pytest.raises(ValueError, match=r"actor.use_chat_template is true but the tokenizer .* has no chat template"):
        encode_prompt(tok, "up 1 2:", PromptFormat(use_chat_template=True))
    tok.bos_token = None
    assert encode_prompt(tok, "up 1 2:") == plain(tok, "up 1 2:")
    with pytest.raises(ValueError, match=r"actor.add_bos is true but the tokenizer .* defines no bos_token"):
        encode_prompt(tok, "up 1 2:", PromptFormat(add_bos=True))


def test_evaluation_takes_the_actor_prompt_format() -> None:
    cfg = load_config(None, ["actor.add_bos=false", "actor.use_chat_template=false"])
    assert (cfg.learner.eval.add_bos, cfg.learner.eval.use_chat_template) == (False, False)
    assert load_config(None, ["actor.add_bos=true", "learner.eval.add_bos=true"]).learner.eval.add_bos is True
    with pytest.raises(ConfigError, match=r"learner.eval.add_bos=False differs from actor.add_bos=True"):
        load_config(None, ["actor.add_bos=true", "learner.eval.add_bos=false"])
    dumped = load_config(None, ["actor.add_bos=true"]).model_dump(mode="json")
    assert OPDConfig.model_validate(dumped).learner.eval.add_bos is True  # a role re-reading the config agrees


def run_config(student: Path, teacher: Path, prompts: Path, tmp_path: Path, redis_url: str,
               add_bos: bool | None) -> list[str]:
    sets = {"transport.redis_url": redis_url, "transport.namespace": "pe", "actor.model_dir": student,
            "actor.prompts_file": prompts, "actor.engine.device": "cpu", "teacher.model_dir": teacher, "teacher.topk": 2,
            "teacher.engine.device": "cpu", "teacher.cache_dir": tmp_path / "cache", "teacher.block_size": 4,
            "learner.model_dir": student, "learner.eval.heldout_file": prompts, "learner.eval.teacher_dir": teacher,
            "actor.add_bos": "null" if add_bos is None else str(add_bos).lower()}
    return [f"{k}={v}" for k, v in sets.items()]


@pytest.mark.parametrize(("variant", "add_bos"), [("bos_convention", None), ("no_bos_convention", None),
                                                  ("chat_template", None), ("no_bos_convention", True)])
def test_actor_cache_warm_and_evaluation_encode_identically(
    variants: dict[str, tuple[Path, Path]], variant: str, add_bos: bool | None, tmp_path: Path, redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    student, teacher = variants[variant]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    overrides = run_config(student, teacher, prompts, tmp_path, redis_url, add_bos)
    cfg = load_config(None, overrides)

    actor = Actor(cfg.actor, cfg.transport, actor_id="actor-pe")
    actor_ids = actor.prompts
    evaluator = HeldoutEvaluator(cfg.learner, AutoTokenizer.from_pretrained(student), torch.device("cpu"))
    assert evaluator.prompts == actor_ids
    has_bos = (add_bos if add_bos is not None else variant != "no_bos_convention")
    assert all((ids[0] == BOS_ID) is has_bos for ids in actor_ids), actor_ids

    sets = [arg for o in overrides for arg in ("--set", o)]
    assert opd_cli.main(["cache", "warm", "--prompts", str(prompts), "--json", *sets]) == 0
    assert json.loads(capsys.readouterr().out)["sequences"] == len(PROMPTS)
    scorer = HFTeacherScorer(teacher)
    cache = open_cache(cfg.teacher, scorer.identity, redis.Redis.from_url(redis_url), Names("pe"), "reader-pe")
    try:
        seqs = [np.asarray(ids, np.int32) for ids in actor_ids]
        assert [h.prefix_len for h in cache.lookup_many(seqs)] == [len(s) for s in seqs]  # warm stored these ids
        toggled = [s[1:] if has_bos else np.concatenate([[BOS_ID], s]).astype(np.int32) for s in seqs]
        assert all(h.prefix_len < len(s) for h, s in zip(cache.lookup_many(toggled), toggled, strict=True))
    finally:
        cache.close()
