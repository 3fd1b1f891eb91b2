"""tfb_core.data: the JSONL format, its errors (file + line), and the paper's prompt."""

from __future__ import annotations

import json

import pytest

from tfb_core.data import MCItem, letter_prompt, read_jsonl, sequence_prompt, write_jsonl
from tfb_core.errors import TFBError


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_jsonl_answers_and_blank_lines(tmp_path):
    f = write(tmp_path / "cal.jsonl", [
        json.dumps({"question": "Q1?", "choices": ["a", "b", "c"], "answer": 2}),
        "",
        "   ",
        json.dumps({"question": "Q2?", "choices": ["yes", "no"], "answer": "B"}),
        json.dumps({"prompt": "Pre-formatted:", "choices": ["x", "y"], "answer": "x", "id": "7"}),
        json.dumps({"question": "Q4?", "choices": ["p", "q"]}),
        json.dumps({"question": "Q5?", "choices": ["p", "q"], "answer": "b"}),
    ])
    items = read_jsonl(f)
    assert [it.answer for it in items] == [2, 1, 0, None, 1]
    assert items[2].prompt == "Pre-formatted:" and items[2].question is None
    assert items[0].choices == ["a", "b", "c"]


def test_write_then_read_roundtrip(tmp_path):
    items = [MCItem(choices=["a", "b"], question="q?", answer=1), MCItem(choices=["c", "d"], prompt="p:")]
    write_jsonl(items, tmp_path / "x.jsonl")
    assert read_jsonl(tmp_path / "x.jsonl") == items


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"choices": ["a", "b"]}), "'question' or 'prompt'"),
    (json.dumps({"question": "q", "choices": ["a"]}), "at least 2"),
    (json.dumps({"question": "q", "choices": "ab"}), "'choices' must be a list"),
    (json.dumps({"question": "q", "choices": ["a", "a"]}), "distinct"),
    (json.dumps({"question": "q", "choices": ["a", ""]}), "non-empty"),
    (json.dumps({"question": "", "choices": ["a", "b"]}), "non-empty string"),
    (json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}), "out of range"),
    (json.dumps({"question": "q", "choices": ["a", "b"], "answer": -1}), "out of range"),
    (json.dumps({"question": "q", "choices": ["a", "b"], "answer": "Z"}), "not an index, a label"),
    (json.dumps({"question": "q", "choices": ["a", "b"], "answer": True}), "not an index"),
    (json.dumps({"question": "q", "choices": ["a", "b"], "answer": 1.0}), "not an index"),
    (json.dumps({"question": "q", "choices": ["a", "b"], "anwser": 1}), "'anwser': did you mean 'answer'?"),
    (json.dumps({"question": "q", "choice": ["a", "b"]}), "'choice': did you mean 'choices'?"),
    (json.dumps({"questoin": "q", "choices": ["a", "b"]}), "'questoin': did you mean 'question'?"),
    (json.dumps({"question": "q", "choices": ["a", "b"], "id": [1]}), "'id' must be a string or an integer"),
]


@pytest.mark.parametrize("line,problem", BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, line, problem):
    good = json.dumps({"question": "fine?", "choices": ["a", "b"], "answer": 0})
    f = write(tmp_path / "cal.jsonl", [good, "", line, good])
    with pytest.raises(TFBError) as e:
        read_jsonl(f)
    msg = str(e.value)
    assert str(f) in msg and "line 3" in msg and problem in msg, msg


def test_not_utf8_names_file_and_line(tmp_path):
    f = tmp_path / "latin1.jsonl"
    good = json.dumps({"question": "fine?", "choices": ["a", "b"]}).encode()
    f.write_bytes(good + b"\n" + '{"question": "caf\u00e9?", "choices": ["a", "b"]}'.encode("latin-1") + b"\n")
    with pytest.raises(TFBError) as e:
        read_jsonl(f)
    assert str(f) in str(e.value) and "line 2" in str(e.value) and "UTF-8" in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(TFBError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(TFBError, match="no items"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(TFBError, match="no such file"):
        read_jsonl(tmp_path)  # a directory


def test_mcitem_checks():
    with pytest.raises(TFBError, match="choice index"):
        MCItem(choices=["a", "b"], question="q", answer=2)
    with pytest.raises(TFBError, match="'question' or 'prompt'"):
        MCItem(choices=["a", "b"])


def test_prompts_are_the_papers():
    assert letter_prompt("Which gas?", ["Oxygen", "CO2", "Neon"]) == (
        "Return the label of the correct answer for the question below.\n\nQuestion: Which gas?\n"
        "Choices:\nA) Oxygen\nB) CO2\nC) Neon\nAnswer:")
    assert sequence_prompt("Which gas?") == "Question: Which gas?\nAnswer:"


def test_utf8_with_bom(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"question": "caf\u00e9?", "choices": ["a", "b"]}).encode() + b"\r\n")
    assert read_jsonl(f)[0].question == "caf\u00e9?"


def test_other_fields_are_metadata_with_one_warning(tmp_path, caplog):
    f = write(tmp_path / "cal.jsonl", [
        json.dumps({"id": "q1", "question": "Q1?", "choices": ["a", "b"], "answer": 0, "source": "arc",
                    "label": 1}),
        json.dumps({"id": 2, "question": "Q2?", "choices": ["a", "b"], "source": "obqa", "subject": "bio"}),
        json.dumps({"question": "Q3?", "choices": ["a", "b"]}),
    ])
    with caplog.at_level("WARNING", logger="tfb_core.data"):
        items = read_jsonl(f)
    assert [it.id for it in items] == ["q1", 2, None]
    assert items[0].metadata == {"source": "arc", "label": 1}  # 'label' is data, not an answer
    assert items[0].answer == 0
    assert items[1].metadata == {"source": "obqa", "subject": "bio"} and items[2].metadata == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert str(f) in warnings[0] and all(repr(k) in warnings[0] for k in ("source", "label", "subject"))
    # metadata and ids survive a round trip
    write_jsonl(items, tmp_path / "again.jsonl")
    assert read_jsonl(tmp_path / "again.jsonl") == items


def test_a_near_name_beside_the_real_field_is_metadata(tmp_path):
    f = write(tmp_path / "cal.jsonl", [json.dumps({"question": "Q?", "question_id": "x7", "choices": ["a", "b"],
                                                   "answers": ["a"], "answer": 0})])
    assert read_jsonl(f)[0].metadata == {"question_id": "x7", "answers": ["a"]}
