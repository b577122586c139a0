"""Data files (src/flashzo/data.py): every example checked up front, every problem named FILE:LINE."""

import json

import pytest

from flashzo.data import DataError, NoTokenizer, load_jsonl, load_tokenizer, read_dataset
from flashzo.engine.example import Limits
from flashzo.errors import InputError

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


# --------------------------------------------------------------------------------------------------
# Malformed text: one line naming the file, the line and (for text) the field
# --------------------------------------------------------------------------------------------------

_GOOD = {None: '{"prompt": "a b", "candidates": [" c", " d"], "label": 0}', "sst2": '{"sentence": "a b", "label": 0}'}
_DEEP = "[" * 100000 + "]" * 100000


@pytest.mark.parametrize("line,template,needle", [
    ('{"prompt": "a \\ud800 b", "candidates": [" c", " d"], "label": 0}', None,
     "prompt holds a lone surrogate \\ud800 at character 3"),
    ('{"prompt": "a b", "candidates": [" c", " d\\udfff"], "label": 0}', None,
     "candidates[1] holds a lone surrogate \\udfff at character 3"),
    ('{"prompt": [2, 3], "target": "x\\ud83d"}', None, "target holds a lone surrogate \\ud83d at character 2"),
    ('{"sentence": "fine \\udc00", "label": 1}', "sst2", "sst2 template: 'sentence' holds a lone surrogate \\udc00"),
    ('{"prompt": "a\\u0000b", "candidates": [" c", " d"], "label": 0}', None,
     "prompt holds a NUL character (\\u0000) at character 2"),
    ('{"prompt": "a b", "candidates": [" c", " d"], "label": 1' + "0" * 5000 + "}", None,
     "not valid JSON (a number of more than"),
    ('{"prompt": "a b", "candidates": ' + _DEEP + ', "label": 0}', None, "not valid JSON (nested deeper than"),
    (_DEEP, "sst2", "not valid JSON (nested deeper than"),
    ('[1, 2]', None, "expected a JSON object, got list"),
    ('{"prompt": "a\x00b"}', None, "not valid JSON (Invalid control character"),
], ids=["surrogate-prompt", "surrogate-candidate", "surrogate-target", "surrogate-template", "nul", "huge-number",
        "deep", "deep-template", "not-an-object", "raw-nul"])
def test_malformed_text_is_one_line_with_file_and_line(tmp_path, line, template, needle):
    """Text a tokenizer cannot take (a lone surrogate from a JSON escape), NUL, numbers and nesting JSON
    cannot read: each is a DataError naming FILE:LINE (never a TypeError, ValueError or RecursionError)."""
    path = tmp_path / "d.jsonl"
    path.write_text(_GOOD[template] + "\n" + line + "\n" + _GOOD[template] + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_dataset(str(path), _WordTokenizer(), template=template, limits=LIMITS, training=False)
    assert [line for line, _ in info.value.problems] == [2], str(info.value)
    assert f"{path}:2: {needle}" in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_a_line_longer_than_the_limit_is_refused_without_reading_it_whole(tmp_path):
    """A 300 MB line (a sparse file: no disk used) is refused with its line number, reading at most the
    limit into memory; the lines after it are read and checked as usual."""
    import tracemalloc

    from flashzo import data

    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"prompt": [1], "target": [2]}\n{"prompt": "')
        f.seek(300 << 20, 1)
        f.write(b'"}\n{"prompt": [1], "target": []}\n')
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            read_dataset(str(path), limits=LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    mib = data.MAX_LINE_BYTES >> 20
    assert f"{path}:2: longer than {mib} MiB (the limit on a line of a data file)" in str(info.value)
    assert f"{path}:3: has an empty target" in str(info.value)
    assert peak < 2 * data.MAX_LINE_BYTES + (8 << 20), peak


def test_running_out_of_memory_names_the_file(tmp_path, monkeypatch):
    from flashzo import data

    path = _write(tmp_path, [{"prompt": [1], "target": [2]}] * 3)
    real, seen = data.record_to_example, []

    def fills_memory(rec, tokenizer=None):
        seen.append(rec)
        if len(seen) == 3:
            raise MemoryError
        return real(rec, tokenizer)
    monkeypatch.setattr(data, "record_to_example", fills_memory)
    with pytest.raises(InputError, match=f"^{path}: out of memory after 2 examples: the file is too large"):
        read_dataset(path, limits=LIMITS)
