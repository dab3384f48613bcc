"""Tiny real models end to end: asset build, HF rollout engine, HF teacher scorer, prompt loading.

Everything runs on CPU against the assets built once per session by the `tiny_assets` fixture.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from actors.engines.hf import HFRolloutEngine
from actors.prompts import load_prompts
from cache.scorers.hf import HFTeacherScorer
from opd.tiny import COMPLETE_MARKER, EOS_ID, TinyAssets, asset_paths, build_tiny_assets
from protocol.vocab import compare_tokenizers, load_tokenizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def assets(tiny_assets: Path) -> TinyAssets:
    return asset_paths(tiny_assets)


@pytest.fixture(scope="module")
def tokenizer(assets: TinyAssets) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(assets.student_dir)


@pytest.fixture(scope="module")
def prompts(assets: TinyAssets, tokenizer: PreTrainedTokenizerFast) -> list[list[int]]:
    return load_prompts(assets.prompts_file, tokenizer, use_chat_template=None)


@pytest.fixture()
def student(assets: TinyAssets) -> HFRolloutEngine:
    return HFRolloutEngine(assets.student_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def teacher_engine(assets: TinyAssets) -> HFRolloutEngine:
    return HFRolloutEngine(assets.teacher_dir)


@pytest.fixture(scope="module")
def scorer(assets: TinyAssets) -> HFTeacherScorer:
    return HFTeacherScorer(assets.teacher_dir, "cpu", torch.float32)


def teacher_forced_logprobs(
    model_dir: Path, prompt: list[int], response: list[int], temperature: float = 1.0
) -> np.ndarray:
    """Reference: a fresh model, one unpadded sequence, logprob of each response token."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1 : -1]
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(1).numpy()


def perturbed_copy(src: Path, dst: Path, scale: float = 0.05, seed: int = 0) -> Path:
    """Same architecture, different weights, saved like a learner checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(dst)
    return dst


# ---- assets --------------------------------------------------------------------------------------


def test_assets_layout_sizes_and_idempotence(tiny_assets: Path, assets: TinyAssets) -> None:
    assert (tiny_assets / COMPLETE_MARKER).exists()
    for d in (assets.student_dir, assets.teacher_dir):
        assert (d / "model.safetensors").exists() and (d / "tokenizer.json").exists()
    info = json.loads((tiny_assets / "build_info.json").read_text())
    assert 500_000 <= info["teacher"]["parameters"] <= 1_000_000
    assert 100_000 <= info["student"]["parameters"] <= 300_000
    before = (assets.teacher_dir / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_assets(tiny_assets, seed=0) == assets  # marker present: nothing rebuilt
    assert (assets.teacher_dir / "model.safetensors").stat().st_mtime_ns == before
    train = [json.loads(line)["prompt"] for line in assets.prompts_file.read_text().splitlines()]
    held = [json.loads(line)["prompt"] for line in assets.heldout_file.read_text().splitlines()]
    assert len(train) == 256 and len(held) == 32 and not set(train) & set(held)


def test_tokenizers_are_shared(assets: TinyAssets) -> None:
    check_same_tokenizer(assets.student_dir, assets.teacher_dir)
    assert (assets.student_dir / "tokenizer.json").read_bytes() == (
        assets.teacher_dir / "tokenizer.json"
    ).read_bytes()


def test_teacher_beats_student_on_heldout_continuations(
    assets: TinyAssets, tokenizer: PreTrainedTokenizerFast, scorer: HFTeacherScorer
) -> None:
    rows = [json.loads(line) for line in assets.heldout_file.read_text().splitlines()]
    sequences, starts = [], []
    for row in rows:
        prompt = [tokenizer.bos_token_id, *tokenizer.encode(row["prompt"], add_special_tokens=False)]
        answer = [*tokenizer.encode(row["continuation"], add_special_tokens=False), EOS_ID]
        sequences.append(np.array(prompt + answer, dtype=np.int32))
        starts.append(len(prompt))
    student_scorer = HFTeacherScorer(assets.student_dir)

    def mean_nll(s: HFTeacherScorer) -> float:
        scores = s.score(sequences, starts, k=0)
        return -float(np.concatenate([x.logprobs_R for x in scores]).mean())

    teacher_nll, student_nll = mean_nll(scorer), mean_nll(student_scorer)
    assert teacher_nll < 1.0 < student_nll - 1.0, (teacher_nll, student_nll)


# ---- rollout engine ------------------------------------------------------------------------------


def test_engine_shapes_and_per_request_limits(student: HFRolloutEngine, prompts: list[list[int]]) -> None:
    limits = [0, 1, 5, 17, 40, 3, 64, 2]
    gens = student.generate(prompts[:8], limits, temperature=1.0, top_p=1.0, seed=0)
    assert len(gens) == 8
    for gen, limit in zip(gens, limits, strict=True):
        assert len(gen.response_ids) == len(gen.logprobs) <= limit
        assert all(math.isfinite(lp) and lp <= 0 for lp in gen.logprobs)
        if gen.finished:
            assert gen.response_ids[-1] == EOS_ID and EOS_ID not in gen.response_ids[:-1]
        else:
            assert len(gen.response_ids) == limit and EOS_ID not in gen.response_ids
    assert gens[0].response_ids == [] and not gens[0].finished
    assert student.generate([], [], temperature=1.0, top_p=1.0, seed=0) == []


def test_engine_behaviour_logprobs_match_teacher_forcing(
    student: HFRolloutEngine, assets: TinyAssets, prompts: list[list[int]]
) -> None:
    batch = prompts[:6]  # different prompt lengths: exercises left padding
    limits = [30, 4, 12, 30, 1, 20]  # different horizons: exercises dropping finished rows
    gens = student.generate(batch, limits, temperature=1.0, top_p=1.0, seed=7)
    for prompt, gen in zip(batch, gens, strict=True):
        reference = teacher_forced_logprobs(assets.student_dir, prompt, gen.response_ids)
        np.testing.assert_allclose(np.array(gen.logprobs), reference, atol=1e-4)


def test_engine_logprobs_follow_temperature_and_top_p(
    student: HFRolloutEngine, assets: TinyAssets, prompts: list[list[int]]
) -> None:
    batch, temperature, top_p = prompts[:4], 0.7, 0.8
    gens = student.generate(batch, [1] * 4, temperature=temperature, top_p=top_p, seed=1)
    model = AutoModelForCausalLM.from_pretrained(assets.student_dir).eval()
    for prompt, gen in zip(batch, gens, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(
                model(input_ids=torch.tensor([prompt])).logits[0, -1] / temperature, dim=-1
            )
        sorted_logp, order = logp.sort(descending=True)
        probs = sorted_logp.exp()
        nucleus = order[(probs.cumsum(0) - probs) < top_p]
        assert gen.response_ids[0] in nucleus.tolist()
        expected = logp[gen.response_ids[0]] - torch.logsumexp(logp[nucleus], dim=0)
        assert gen.logprobs[0] == pytest.approx(float(expected), abs=1e-5)
    # A vanishing nucleus is greedy, sampled with certainty.
    tiny = student.generate(batch, [5] * 4, temperature=1.0, top_p=1e-9, seed=2)
    greedy = student.generate(batch, [5] * 4, temperature=0.0, top_p=1.0, seed=None)
    assert [g.response_ids for g in tiny] == [g.response_ids for g in greedy]
    assert all(lp == 0.0 for g in tiny for lp in g.logprobs)


def test_engine_is_seeded(student: HFRolloutEngine, prompts: list[list[int]]) -> None:
    def run(seed: int) -> list[list[int]]:
        return [
            g.response_ids
            for g in student.generate(prompts[:4], [16] * 4, temperature=1.0, top_p=1.0, seed=seed)
        ]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_engine_stops_rows_on_eos(teacher_engine: HFRolloutEngine, prompts: list[list[int]]) -> None:
    gens = teacher_engine.generate(prompts[:8], [64] * 8, temperature=0.0, top_p=1.0, seed=None)
    assert sum(g.finished for g in gens) >= 6  # the trained teacher ends its answers
    for gen in gens:
        if gen.finished:
            assert gen.response_ids[-1] == EOS_ID and EOS_ID not in gen.response_ids[:-1]
    # Overriding the stop tokens: every answer starts with a space, so each row stops after one token.
    space = AutoTokenizer.from_pretrained(teacher_engine.model_dir).convert_tokens_to_ids(" ")
    early = HFRolloutEngine(teacher_engine.model_dir, eos_token_ids=[space])
    gens = early.generate(prompts[:8], [64] * 8, temperature=0.0, top_p=1.0, seed=None)
    assert all(g.finished and g.response_ids == [space] for g in gens)


def test_engine_load_weights_fast_path_and_fallback(
    student: HFRolloutEngine, assets: TinyAssets, prompts: list[list[int]], tmp_path: Path
) -> None:
    def run() -> list[list[int]]:
        return [
            g.response_ids
            for g in student.generate(prompts[:4], [16] * 4, temperature=1.0, top_p=1.0, seed=5)
        ]

    original = run()
    model_before = student.model
    student.load_weights(str(perturbed_copy(assets.student_dir, tmp_path / "v1")), version=1)
    assert student.model is model_before  # same architecture: tensors copied in place
    assert student.version == 1
    changed = run()
    assert changed != original
    fresh = HFRolloutEngine(tmp_path / "v1")
    assert [
        g.response_ids for g in fresh.generate(prompts[:4], [16] * 4, temperature=1.0, top_p=1.0, seed=5)
    ] == changed
    shutil.rmtree(tmp_path / "v1")  # the learner may delete old versions: must not matter
    student.load_weights(str(assets.student_dir), version=2)
    assert student.model is model_before
    assert run() == original
    student.load_weights(str(assets.teacher_dir), version=3)  # different architecture: full reload
    assert student.num_parameters() == HFRolloutEngine(assets.teacher_dir).num_parameters()
    with pytest.raises(FileNotFoundError, match=r"published weights v4: .*missing does not exist"):
        student.load_weights(str(tmp_path / "missing"), version=4)


def test_engine_rejects_bad_requests(student: HFRolloutEngine, prompts: list[list[int]]) -> None:
    with pytest.raises(ValueError, match="max_new_tokens has 1 entries"):
        student.generate(prompts[:2], [4], temperature=1.0, top_p=1.0, seed=0)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        student.generate([prompts[0], []], [4, 4], temperature=1.0, top_p=1.0, seed=0)
    with pytest.raises(ValueError, match="top_p"):
        student.generate(prompts[:1], [4], temperature=1.0, top_p=0.0, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        student.generate(prompts[:1], [4], temperature=-1.0, top_p=1.0, seed=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        student.generate(prompts[:1], [10_000], temperature=1.0, top_p=1.0, seed=0)
    with pytest.raises(ValueError, match=r"prompts\[0\] has token ids"):
        student.generate([[1, 10_000]], [4], temperature=1.0, top_p=1.0, seed=0)


# ---- teacher scorer ------------------------------------------------------------------------------


def scoring_batch(prompts: list[list[int]]) -> tuple[list[np.ndarray], list[int]]:
    """Prompt + a few arbitrary response tokens, with varied starts (including an empty response)."""
    rng = np.random.default_rng(0)
    sequences, starts = [], []
    for i, prompt in enumerate(prompts[:7]):
        response = rng.integers(4, 52, size=3 + 4 * i).tolist()
        sequences.append(np.array(prompt + response, dtype=np.int32))
        starts.append(len(prompt))
    sequences.append(np.array(prompts[7], dtype=np.int32))
    starts.append(len(prompts[7]))  # nothing to score
    sequences.append(np.array(prompts[8], dtype=np.int32))
    starts.append(1)  # score the whole prompt after <bos>
    return sequences, starts


def test_scorer_matches_manual_forward(assets: TinyAssets, prompts: list[list[int]]) -> None:
    sequences, starts = scoring_batch(prompts)
    small_batches = HFTeacherScorer(assets.teacher_dir, max_batch_tokens=64)  # forces several forwards
    for scorer in (HFTeacherScorer(assets.teacher_dir), small_batches):
        scores = scorer.score(sequences, starts, k=5)
        assert scorer.tokens_forwarded == sum(
            len(s) for s, st in zip(sequences, starts, strict=True) if st < len(s)
        )
        for seq, start, got in zip(sequences, starts, scores, strict=True):
            ids = seq.tolist()
            r = len(ids) - start
            assert got.logprobs_R.shape == (r,) and got.logprobs_R.dtype == np.float32
            assert got.topk_ids_RK.shape == (r, 5) and got.topk_ids_RK.dtype == np.int32
            assert got.topk_logprobs_RK.shape == (r, 5) and got.topk_logprobs_RK.dtype == np.float32
            if r:
                expected = teacher_forced_logprobs(assets.teacher_dir, ids[:start], ids[start:])
                np.testing.assert_allclose(got.logprobs_R, expected, atol=1e-4)


def test_scorer_topk_sorted_and_consistent(
    scorer: HFTeacherScorer, assets: TinyAssets, prompts: list[list[int]]
) -> None:
    sequences, starts = scoring_batch(prompts)
    model = AutoModelForCausalLM.from_pretrained(assets.teacher_dir).eval()
    for seq, start, got in zip(sequences, starts, scorer.score(sequences, starts, k=8), strict=True):
        if len(seq) == start:
            continue
        assert np.all(np.diff(got.topk_logprobs_RK, axis=1) <= 0)
        assert np.all(got.topk_logprobs_RK[:, 0] >= got.logprobs_R - 1e-6)
        with torch.no_grad():
            logp = torch.log_softmax(
                model(input_ids=torch.tensor(seq[None].astype(np.int64))).logits[0], dim=-1
            )
        logp_RV = logp[start - 1 : -1].numpy()
        np.testing.assert_allclose(
            np.take_along_axis(logp_RV, got.topk_ids_RK.astype(np.int64), axis=1),
            got.topk_logprobs_RK,
            atol=1e-4,
        )
        np.testing.assert_allclose(np.sort(logp_RV, axis=1)[:, ::-1][:, :8], got.topk_logprobs_RK, atol=1e-4)
        for j, token in enumerate(seq[start:]):  # where the given token is in the top-k, both agree
            hit = np.nonzero(got.topk_ids_RK[j] == token)[0]
            if hit.size:
                assert got.topk_logprobs_RK[j, hit[0]] == pytest.approx(got.logprobs_R[j], abs=1e-5)


def test_scorer_k_zero_temperature_and_counting(assets: TinyAssets, prompts: list[list[int]]) -> None:
    sequences, starts = scoring_batch(prompts)
    hot = HFTeacherScorer(assets.teacher_dir, temperature=2.0)
    for seq, start, got in zip(sequences, starts, hot.score(sequences, starts, k=0), strict=True):
        r = len(seq) - start
        assert got.topk_ids_RK.shape == (r, 0) and got.topk_logprobs_RK.shape == (r, 0)
        if r:
            ids = seq.tolist()
            expected = teacher_forced_logprobs(assets.teacher_dir, ids[:start], ids[start:], temperature=2.0)
            np.testing.assert_allclose(got.logprobs_R, expected, atol=1e-4)
    before = hot.tokens_forwarded
    hot.score([sequences[7]], [starts[7]], k=3)  # empty response: no forward at all
    assert hot.tokens_forwarded == before


def test_scorer_identity(assets: TinyAssets, scorer: HFTeacherScorer, tmp_path: Path) -> None:
    assert HFTeacherScorer(assets.teacher_dir).identity == scorer.identity
    moved = tmp_path / "moved"
    shutil.copytree(assets.teacher_dir, moved)
    assert HFTeacherScorer(moved).identity == scorer.identity  # content, not location
    assert HFTeacherScorer(assets.teacher_dir, temperature=0.5).identity != scorer.identity
    assert HFTeacherScorer(assets.teacher_dir, dtype="bfloat16").identity != scorer.identity
    assert HFTeacherScorer(assets.teacher_dir, revision="abc123").identity != scorer.identity
    changed = perturbed_copy(assets.teacher_dir, tmp_path / "changed")
    shutil.copy(assets.teacher_dir / "tokenizer.json", changed / "tokenizer.json")
    shutil.copy(assets.teacher_dir / "tokenizer_config.json", changed / "tokenizer_config.json")
    assert HFTeacherScorer(changed).identity != scorer.identity
    assert (
        scorer.num_parameters()
        == json.loads((assets.teacher_dir.parent / "build_info.json").read_text())["teacher"]["parameters"]
    )


def test_scorer_rejects_bad_input(scorer: HFTeacherScorer) -> None:
    seq = np.array([1, 5, 6], dtype=np.int32)
    with pytest.raises(ValueError, match="starts has 2 entries"):
        scorer.score([seq], [1, 2], k=1)
    with pytest.raises(ValueError, match=r"starts\[0\]=0"):
        scorer.score([seq], [0], k=1)
    with pytest.raises(ValueError, match=r"starts\[0\]=4"):
        scorer.score([seq], [4], k=1)
    with pytest.raises(ValueError, match="k must be"):
        scorer.score([seq], [1], k=-1)
    with pytest.raises(ValueError, match=r"sequences\[0\] must be a 1-D integer"):
        scorer.score([seq.astype(np.float32)], [1], k=1)
    with pytest.raises(ValueError, match=r"sequences\[0\] has token ids"):
        scorer.score([np.array([1, 999], dtype=np.int32)], [1], k=1)
    with pytest.raises(ValueError, match="temperature"):
        HFTeacherScorer(scorer.model_dir, temperature=0.0)


# ---- prompts and tokenizer checks ----------------------------------------------------------------


def test_load_prompts_uses_bos_and_plain_tokens(
    assets: TinyAssets, tokenizer: PreTrainedTokenizerFast, prompts: list[list[int]]
) -> None:
    first = json.loads(assets.prompts_file.read_text().splitlines()[0])["prompt"]
    assert len(prompts) == 256
    assert prompts[0] == [tokenizer.bos_token_id, *(tokenizer.convert_tokens_to_ids(c) for c in first)]
    assert tokenizer.decode(prompts[0], skip_special_tokens=True) == first


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "up 1 2:"}', '{"prompt": "up 3 4:"', '{"prompt": "x"}'], r":2: invalid JSON"),
        (['{"prompt": "up 1 2:"}', "", '{"text": "up 3 4:"}'], r":3: missing 'prompt'"),
        (['{"prompt": 5}'], r":1: 'prompt' must be a string, got int"),
        (['["up 1 2:"]'], r":1: expected a JSON object"),
        (['{"prompt": ""}'], r":1: 'prompt' is empty"),
        ([""], "no prompts"),
    ],
)
def test_load_prompts_errors_name_the_line(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, lines: list[str], message: str
) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        load_prompts(path, tokenizer, use_chat_template=None)


def test_load_prompts_chat_template(assets: TinyAssets, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(assets.student_dir)
    with pytest.raises(ValueError, match="no chat template"):
        load_prompts(assets.heldout_file, tok, use_chat_template=True)
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }};{% endfor %}{% if add_generation_prompt %}={% endif %}"
    )
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ab"}\n')
    assert load_prompts(path, tok, use_chat_template=None) == [tok.convert_tokens_to_ids(list("ab;="))]
    assert load_prompts(path, tok, use_chat_template=False) == [
        [tok.bos_token_id, *tok.convert_tokens_to_ids(list("ab"))]
    ]


def save_char_tokenizer(path: Path, chars: str, specials: list[str], eos: str = "<eos>") -> Path:
    vocab = {tok: i for i, tok in enumerate([*specials, *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token=eos, pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(path)
    return path


def check_same_tokenizer(student_dir: Path, teacher_dir: Path) -> None:
    """The tokenizers saved in two model directories, compared as `protocol.vocab.check_model_dirs` does."""
    compare_tokenizers(load_tokenizer(student_dir), load_tokenizer(teacher_dir))


def test_check_same_tokenizer_names_the_mismatch(tmp_path: Path) -> None:
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    base = save_char_tokenizer(tmp_path / "base", "abc", specials)
    check_same_tokenizer(base, save_char_tokenizer(tmp_path / "same", "abc", specials))
    with pytest.raises(ValueError, match="vocab size differs: student 7 vs teacher 8"):
        check_same_tokenizer(base, save_char_tokenizer(tmp_path / "bigger", "abcd", specials))
    with pytest.raises(ValueError, match=r"token ids differ for 2 tokens.*'a': 4 vs 5"):
        check_same_tokenizer(base, save_char_tokenizer(tmp_path / "swapped", "bac", specials))
    with pytest.raises(ValueError, match="eos_token differs"):
        check_same_tokenizer(base, save_char_tokenizer(tmp_path / "eos", "abc", specials, eos="<pad>"))
