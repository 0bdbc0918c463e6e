"""``comp data check``: counts, error classes with examples, exit status, --json, syntax errors."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from PIL import Image

from comp.cli import data_main
from test_data_dataset import MAX_LEN, make_mixed


@pytest.fixture()
def mixed(tmp_path):
    return make_mixed(tmp_path)


def run_json(capsys, argv) -> tuple[int, dict]:
    status = data_main(["check", *argv, "--json"])
    return status, json.loads(capsys.readouterr().out)


def test_mixed_file_counts_and_exit_status(tmp_path, mixed, tiny_dir, capsys):
    path, expected = mixed
    argv = [str(path), "--image_folder", str(tmp_path / "images"), "--max_num_vistoken", "16",
            "--model_max_length", str(MAX_LEN), "--tokenizer", str(tiny_dir("qwen2"))]
    status, summary = run_json(capsys, argv)
    assert status == 1
    assert summary["records"] == len(expected) == summary["datasets"][0]["records"]
    want = Counter(r for r in expected.values() if r)
    assert {k: v["count"] for k, v in summary["errors"].items()} == dict(want)
    assert summary["num_errors"] == sum(want.values())
    assert summary["images"] == 4  # good_one 1 + good_two 2 + good_noph 1
    assert summary["text_only"] == 1
    assert summary["over_model_max_length"] == 1
    assert sum(summary["visual_tokens_per_image"].values()) == 4
    assert sum(summary["sequence_tokens_per_sample"].values()) == 4
    assert any("id bad_missing" in ex for ex in summary["errors"]["missing_image"]["examples"])
    assert any(":4:" in ex for ex in summary["errors"]["malformed_record"]["examples"])
    # Two worker processes find the same.
    status2, summary2 = run_json(capsys, argv + ["--workers", "2"])
    assert status2 == 1 and summary2 == summary
    # The human-readable summary names every error class.
    assert data_main(["check", *argv]) == 1
    text = capsys.readouterr().out
    assert all(f"{reason}: {n}" in text for reason, n in want.items())


def test_clean_file_exits_zero(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (300, 200)).save(tmp_path / "img" / "a.png")
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": 1, "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}]))
    status, summary = run_json(capsys, [str(data), "--image_folder", str(tmp_path / "img"),
                                        "--max_num_vistoken", "64", "--force_resize", "56"])
    assert status == 0 and summary["num_errors"] == 0 and summary["images"] == 1
    assert summary["visual_tokens_per_image"]["0-15"] == 1  # 56x56 -> 2x2 merged tokens
    assert summary["text_tokens_per_sample"] is None  # no --tokenizer


def test_json_syntax_error_reports_line_and_column(tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text('[\n {"id": 1, "conversations": []},\n {"id": 2 "conversations": []}\n]')
    status, summary = run_json(capsys, [str(data)])
    assert status == 1
    (example,) = summary["errors"]["json_syntax"]["examples"]
    assert f"{data}:3:11" in example


def test_mixture_yaml_with_missing_file(tmp_path, mixed, capsys):
    path, expected = mixed
    yml = tmp_path / "mix.yaml"
    yml.write_text(f"datasets:\n  - {{json_path: {path.name}, sampling_strategy: 'first:3', image_folder: images}}\n"
                   "  - {json_path: gone.json}\n")
    status, summary = run_json(capsys, [str(yml)])
    assert status == 1
    assert [d["records"] for d in summary["datasets"]] == [3, 0]
    assert summary["errors"]["missing_data_file"]["count"] == 1
    assert set(summary["errors"]) == {"missing_data_file"}  # the first three records are fine


def test_bad_mixture_is_a_usage_error(tmp_path, capsys):
    yml = tmp_path / "mix.yaml"
    yml.write_text("datasets: 3")
    assert data_main(["check", str(yml)]) == 2
    assert str(yml) in capsys.readouterr().err


def test_data_cli_dispatch(capsys):
    assert data_main([]) == 0 and "check" in capsys.readouterr().out
    assert data_main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err


def test_a_huge_record_is_counted_over_length_without_tokenising_it_whole(tmp_path, tiny_dir, monkeypatch):
    """A 10 MB answer: counted as over model_max_length (its length capped at 4x), no error;
    the tokenizer never sees more than the cap's characters."""
    from comp.data import conversation

    seen = []
    real = conversation.encode_conversation
    monkeypatch.setattr("comp.data.check.encode_conversation",
                        lambda tok, messages, counts, max_length: seen.append(max_length) or real(tok, messages, counts, max_length=max_length))
    record = {"id": "big", "conversations": [{"from": "human", "value": "hi"},
                                             {"from": "gpt", "value": "word " * 2_000_000}]}
    (tmp_path / "big.json").write_text(json.dumps([record]))
    from comp.data.check import check

    summary = check(str(tmp_path / "big.json"), tokenizer_dir=str(tiny_dir("qwen2")), model_max_length=256)
    assert (summary["over_model_max_length"], summary["num_errors"]) == (1, 0)
    assert summary["sequence_tokens_per_sample"]["1024-2047"] == 1  # 4 x 256 = 1024 tokens counted
    assert max(seen) == 4 * 256
