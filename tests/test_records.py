import pytest
from tests.conftest import write_jsonl

from lorasmith.data.records import read_source
from lorasmith.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"messages": [', "invalid JSON"),
        ('{"text": "hi"}', 'no "messages" field'),
        ('{"messages": []}', "`messages` is empty"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}', "is empty"),
        ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}', "no text content"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
            '{"role": "assistant", "content": "x"}]}',
            "only the first message",
        ),
    ],
)
def test_each_problem_is_reported_with_file_and_line(tmp_path, line, fragment):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, line, GOOD])
    with pytest.raises(DataError) as e:
        read_source(path)
    assert f"{path}:2: " in e.value.message
    assert fragment in e.value.message


def test_skip_bad_records_counts_them(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "not json", GOOD, '{"messages": []}'])
    result = read_source(path, skip_bad=True)
    assert len(result.conversations) == 2
    assert [p.split(": ")[0] for p in result.problems] == [f"{path}:2", f"{path}:4"]


def test_missing_file_and_weights(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_source(tmp_path / "nope.jsonl")
    row = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "train": False},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d", "weight": 0.5},
        ]
    }
    conv = read_source(write_jsonl(tmp_path / "w.jsonl", [row])).conversations[0]
    assert [m["weight"] for m in conv.messages] == [1.0, 0.0, 1.0, 0.5]
