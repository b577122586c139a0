"""Data files (src/flashzo/data.py): every example checked up front, every problem named FILE:LINE."""

import json

import pytest

from flashzo.data import DataError, NoTokenizer, load_jsonl, load_tokenizer, read_dataset
from flashzo.engine.example import Limits

LIMITS = Limits(vocab_size=100, max_positions=16)


def _write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return str(path)


def test_every_problem_of_a_file_is_reported_with_its_line(tmp_path):
    path = _write(tmp_path, [
        {"prompt": [1, 2], "candidates": [[3], [4]], "label": 1},      # 1: fine
        {"prompt": [1] * 15, "candidates": [[3, 4], [5]], "label": 0},  # 2: 17 tokens > 16 positions
        "{not json",                                                    # 3
        {"prompt": [1], "candidates": [[3]], "label": 0},               # 4: one candidate
        {"prompt": [1], "candidates": [[3], [4]], "label": True},       # 5: a bool is not a label
        {"prompt": [1], "candidates": [[3], [400]], "label": 0},        # 6: token id outside the vocabulary
        {"prompt": [1], "candidates": [[3], [4]], "label": 2},          # 7: label out of range
        "",                                                             # 8: blank lines are skipped
        {"prompt": [1], "target": []},                                  # 9: empty target
    ])
    with pytest.raises(DataError) as info:
        load_jsonl(path, limits=LIMITS)
    msg = str(info.value)
    lines = sorted({line for line, _ in info.value.problems})
    assert lines == [0, 2, 3, 4, 5, 6, 7, 9], msg  # 0: the file mixes classification and LM
    for needle in (f"{path}:2: prompt + candidate 0 is 17 tokens", f"{path}:3: not valid JSON",
                   f"{path}:4: has 1 candidate", f"{path}:5: classification needs an integer 'label'",
                   f"{path}:6: candidate 1 has token id 400", f"{path}:7: label 2 is out of range",
                   f"{path}:9: has an empty target", "mixes classification (first on line 1) and LM"):
        assert needle in msg, (needle, msg)
    assert isinstance(info.value, ValueError)


def test_problems_are_capped(tmp_path):
    path = _write(tmp_path, [{"prompt": [1], "candidates": [[3]], "label": 0}] * 30)
    with pytest.raises(DataError) as info:
        read_dataset(path, limits=LIMITS, max_errors=5)
    assert len(info.value.problems) == 5 and "and 25 more problems" in str(info.value)


def test_lines_are_kept_and_eval_may_skip_training_checks(tmp_path):
    path = _write(tmp_path, ["", {"prompt": [1], "candidates": [[3], [4]], "label": 0}, "",
                             {"prompt": [2], "candidates": [[5]]}])
    with pytest.raises(DataError):
        read_dataset(path, limits=LIMITS)
    ds = read_dataset(path, limits=LIMITS, training=False)
    assert ds.lines == [2, 4] and len(ds.examples) == 2


@pytest.mark.parametrize("template,record,label", [
    ("sst2", {"idx": 7, "sentence": "a fine film ", "label": 1}, 1),
    ("sst2", {"sentence": "bad", "label": "negative"}, 0),
    ("sst2", {"sentence": "bad", "label": "0"}, 0),
    ("rte", {"idx": 0, "premise": "A dog.", "hypothesis": "An animal.", "label": "entailment"}, 0),
    ("rte", {"premise": "A dog.", "hypothesis": "A cat.", "label": "not_entailment"}, 1),
    ("copa", {"premise": "It rained.", "choice1": "We stayed in.", "choice2": "We swam.", "question": "effect",
              "label": 0, "idx": 3}, 0),
])
def test_templates_read_real_files(tmp_path, template, record, label):
    ex = load_jsonl(_write(tmp_path, [record]), tokenizer=_WordTokenizer(), template=template)[0]
    assert ex.label == label and len(ex.candidates) == 2


@pytest.mark.parametrize("template,record,needle", [
    ("sst2", {"sentence": None, "label": 1}, "'sentence' must be a string, got null"),
    ("sst2", {"text": "x", "label": 1}, "no 'sentence' field"),
    ("sst2", {"sentence": "x", "label": "great"}, "'label' must be one of"),
    ("sst2", {"sentence": "x", "label": True}, "'label' must be one of"),
    ("copa", {"premise": "p", "choice1": "a", "choice2": "b", "question": "why", "label": 0}, "'question'"),
])
def test_template_errors_name_file_and_line(tmp_path, template, record, needle):
    path = _write(tmp_path, [record, record])
    with pytest.raises(DataError) as info:
        load_jsonl(path, tokenizer=_WordTokenizer(), template=template)
    assert f"{path}:1: {template} template: {needle}" in str(info.value)
    assert f"{path}:2:" in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_jsonl(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="not a file"):
        load_jsonl(str(tmp_path))
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": [1], "target": [1]}\n{"prompt": "caf\xe9", "target": [1]}\n\xff\n')
    with pytest.raises(DataError) as info:
        load_jsonl(str(bad))
    assert f"{bad}:2: not UTF-8 text (byte 16 of the line" in str(info.value)
    assert f"{bad}:3: not UTF-8 text (byte 1 of the line" in str(info.value)


def test_text_without_a_tokenizer_is_refused_once_with_the_reason(tmp_path):
    path = _write(tmp_path, [{"prompt": [1], "target": [1]}] + [{"prompt": "words", "target": [1]}] * 5)
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    assert info.value.problems == [(2, info.value.problems[0][1])]
    assert "prompt is text but the model has no tokenizer" in str(info.value)
    with pytest.raises(DataError, match=f"{path}:2: prompt is text but the model has no tokenizer: /m has none"):
        load_jsonl(path, tokenizer=NoTokenizer("/m has none"))


def test_a_model_directory_without_tokenizer_files(tmp_path):
    """transformers gives such a directory an empty tokenizer (text -> no tokens): the cause is named."""
    transformers = pytest.importorskip("transformers")
    transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=16, num_attention_heads=2,
                           max_position_embeddings=16).save_pretrained(tmp_path)
    assert len(transformers.AutoTokenizer.from_pretrained(str(tmp_path))("a b c")["input_ids"]) == 0
    with pytest.raises(ValueError, match=f"{tmp_path} has no tokenizer files \\(none of tokenizer.json, vocab.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "vocab.json").write_text("{}")  # a vocabulary file, but an empty one
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="turns text into no tokens|cannot be loaded"):
        load_tokenizer(str(tmp_path))


class _WordTokenizer:
    """Whitespace words -> ids (enough for the templates' text)."""

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + (sum(map(ord, w)) % 90) for w in text.split()]
        return {"input_ids": ([2] if add_special_tokens else []) + ids}
