"""--probe_words (hooks/openrlhf_hooks/probe.py): the reply-start statistics against a float64
reference, the rows the probe reads, the word resolution and its errors, and the launcher's dry run."""

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import no_gpu_packages
from openrlhf_hooks import probe
from openrlhf_hooks.testing.tiny_model import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def reference(logits, token_ids):
    p = torch.softmax(logits.double(), -1)
    per_word = torch.stack([p[:, ids].sum(-1) for ids in token_ids], -1)
    q = per_word / per_word.sum(-1, keepdim=True)
    return -(q * q.log()).sum(-1), 1 - per_word.sum(-1)


def test_word_statistics_match_a_float64_reference():
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(0)) * 3
    token_ids = [[3, 17], [5], [40, 41, 42]]
    entropy, tail = probe.word_statistics(logits, token_ids)
    want_entropy, want_tail = reference(logits, token_ids)
    torch.testing.assert_close(entropy.double(), want_entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tail.double(), want_tail, atol=1e-6, rtol=1e-5)
    # all mass on one word: no indecision; an even split over the words: log(3)
    certain = torch.full((1, 50), -30.0)
    certain[0, 5] = 30.0
    assert probe.word_statistics(certain, token_ids)[0].item() < 1e-6
    even = torch.full((1, 50), -30.0)
    even[0, [3, 5, 40]] = 10.0
    assert abs(probe.word_statistics(even, token_ids)[0].item() - torch.tensor(3.0).log().item()) < 1e-5


def test_reply_starts_are_the_first_token_of_each_run_of_action_tokens():
    mask = torch.tensor([[1, 1, 0, 0, 1, 0, 1, 1], [0, 0, 1, 1, 1, 0, 0, 0]])
    starts = probe.reply_starts(mask)
    assert starts.tolist() == [[1, 0, 0, 0, 1, 0, 1, 0], [0, 0, 1, 0, 0, 0, 0, 0]]


class FakeActor:
    """An Actor-like module: forward(sequences, action_mask, attention_mask, return_output=...)."""

    training = True

    def __init__(self, logits):
        self.logits = logits
        self.packing_samples = False

    def forward(self, sequences, action_mask=None, attention_mask=None, return_output=False, **kwargs):
        log_probs = torch.zeros(action_mask.shape)
        return (log_probs, {"logits": self.logits}) if return_output else log_probs


def test_the_probe_reads_the_rows_that_predict_each_reply_start_and_averages_over_ranks():
    vocab, length = 12, 9
    sequences = torch.arange(length).repeat(2, 1)
    action_mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]])  # action window: the last 5 tokens
    # every row puts its mass on word 0; the rows predicting a reply start split it 50/50 with word 1
    logits = torch.full((2, length, vocab), -20.0)
    logits[..., 2] = 20.0
    window_start = length - 1 - action_mask.shape[1]
    starts = probe.reply_starts(action_mask)
    for b, a in starts.nonzero().tolist():
        logits[b, window_start + a, [2, 7]] = 20.0
    actor = FakeActor(logits)
    reduced = []

    def all_reduce_sum(tensor):  # two ranks that saw the same batch
        reduced.append(tensor.clone())
        return tensor * 2

    reader = probe.ReplyStartProbe(actor, [[2], [7]], all_reduce_sum)
    attention = torch.ones_like(sequences)
    assert actor.forward(sequences, action_mask, attention).shape == action_mask.shape  # the host's return value
    log_probs, output = actor.forward(sequences, action_mask, attention, return_output=True)
    assert output["logits"] is logits
    with torch.no_grad():  # a no-grad forward (make_experience, evaluation) is not read
        actor.forward(sequences, action_mask, attention)
    metrics = reader.end_step()
    assert metrics["probe/reply_starts"] == 2 * 2 * starts.sum().item()  # 2 training forwards, 2 ranks
    assert abs(metrics["probe/action_entropy"] - torch.tensor(2.0).log().item()) < 1e-5
    assert metrics["probe/tail_mass"] < 1e-6
    assert reader.end_step() == {"probe/reply_starts": 0.0}  # the sums restart each step
    # off by one row, every start would read the 100%-word-0 rows: entropy 0
    logits.fill_(-20.0)
    logits[..., 2] = 20.0
    actor.forward(sequences, action_mask, attention)
    assert reader.end_step()["probe/action_entropy"] < 1e-6


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return path


def test_words_resolve_to_their_one_token_spellings_and_bad_words_are_named(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = probe.resolve_word_tokens(["open", "door"], tokenizer, "tiny")
    for word, word_ids in zip(["open", "door"], ids):
        assert word_ids and all(tokenizer.decode([i]).strip() == word for i in word_ids)
    with pytest.raises(probe.ProbeError, match="'xqzvw' is not one token of tiny's tokenizer"):
        probe.resolve_word_tokens(["open", "xqzvw"], tokenizer, "tiny")
    with pytest.raises(probe.ProbeError, match="at least two"):
        probe.parse_words("left")
    with pytest.raises(probe.ProbeError, match="twice"):
        probe.parse_words("left,left")


def launch(*argv):
    return subprocess.run(no_gpu_packages.command(*argv), capture_output=True, text=True, timeout=300, cwd=ROOT)


def flags(model, prompts):
    return ["--actor.model_name_or_path", str(model), "--algo.advantage.estimator", "group_norm",
            "--rollout.n_samples_per_prompt", "2", "--rollout.batch_size", "4", "--train.batch_size", "8",
            "--data.prompt_dataset", str(prompts), "--data.input_key", "prompt"]  # fmt: skip


def test_the_dry_run_reports_the_probe_token_ids_and_a_bad_word_is_one_line(tokenizer_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"task {i}"}) + "\n" for i in range(8)))
    done = launch(*flags(tokenizer_dir, prompts), "--probe_words", "open,door", "--plugins_dry_run")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["probe"]["words"] == ["open", "door"] and len(report["probe"]["token_ids"]) == 2
    bad = launch(*flags(tokenizer_dir, prompts), "--probe_words", "open,xqzvw", "--plugins_dry_run")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines()[-1].startswith("python -m openrlhf_hooks.train_ppo_ray: error: --probe_words: 'xqzvw'")
