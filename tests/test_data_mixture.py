"""Mixture YAML parsing, sampling strategies and path resolution."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from comp.data.mixture import MixtureError, Strategy, load_mixture, parse_strategy, select_indices

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, n, expected", [
    ("all", 10, list(range(10))),
    ("first:3", 10, [0, 1, 2]),
    ("end:3", 10, [7, 8, 9]),
    ("first:10%", 25, [0, 1, 2]),  # ceil(2.5)
    ("end:50%", 5, [2, 3, 4]),  # ceil(2.5)
    ("first:100", 4, [0, 1, 2, 3]),  # capped
    ("end:0", 4, []),
])
def test_deterministic_strategies(text, n, expected):
    assert select_indices(parse_strategy(text), n, seed=0).tolist() == expected


def test_random_is_seeded_sorted_and_independent_of_global_state():
    strategy = parse_strategy("random:30%")
    np.random.seed(1)
    a = select_indices(strategy, 1000, seed=7, position=2)
    np.random.seed(2)
    b = select_indices(strategy, 1000, seed=7, position=2)
    assert len(a) == 300 and len(set(a.tolist())) == 300
    assert np.array_equal(a, b) and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, select_indices(strategy, 1000, seed=8, position=2))
    assert not np.array_equal(a, select_indices(strategy, 1000, seed=7, position=3))


def test_random_same_on_another_rank_process():
    code = ("import random, numpy as np; random.seed(5); np.random.seed(5);"
            "from comp.data.mixture import parse_strategy, select_indices;"
            "print(select_indices(parse_strategy('random:17'), 100, seed=3).tolist())")
    other = json.loads(subprocess.check_output([sys.executable, "-c", code], text=True))
    assert other == select_indices(parse_strategy("random:17"), 100, seed=3).tolist()


@pytest.mark.parametrize("bad", ["some", "first:", "first:x", "random:-1", "end:150%", "first:2.5", "last:3"])
def test_bad_strategy_message(bad):
    with pytest.raises(ValueError, match="sampling_strategy"):
        parse_strategy(bad)


def test_strategy_counts():
    assert Strategy("random", 10, True).count(95) == 10  # ceil(9.5)
    assert parse_strategy("first:12.5%").count(8) == 1


@pytest.mark.parametrize("name, n", [("stage1.yaml", 1), ("stage2.yaml", 7), ("stage3.yaml", 2)])
def test_seed_yamls_parse(name, n, tmp_path):
    specs = load_mixture(REPO / "scripts" / "data" / name, data_root=tmp_path)
    assert len(specs) == n
    assert all(s.strategy == Strategy("all") for s in specs)
    assert all(s.json_path.is_relative_to(tmp_path / "data") for s in specs)


def test_relative_paths_resolve(tmp_path):
    yml = tmp_path / "cfg" / "mix.yaml"
    yml.parent.mkdir()
    yml.write_text("datasets:\n"
                   "  - {json_path: a.json, sampling_strategy: 'first:2'}\n"
                   "  - {json_path: /abs/b.jsonl, image_folder: imgs}\n")
    a, b = load_mixture(yml, image_folder="/global")
    assert a.json_path == tmp_path / "cfg" / "a.json" and a.image_root == Path("/global")
    assert b.json_path == Path("/abs/b.jsonl") and b.image_root == tmp_path / "cfg" / "imgs"
    assert b.strategy == Strategy("all")
    (c,) = load_mixture(yml.parent / "x.jsonl")  # a single file, no image folder
    assert c.image_root == yml.parent
    a2, _ = load_mixture(yml, data_root=tmp_path / "root")
    assert a2.json_path == tmp_path / "root" / "a.json"


@pytest.mark.parametrize("text, match", [
    ("datasets: []", "non-empty list"),
    ("nothing: 1", "non-empty list"),
    ("datasets:\n  - {sampling_strategy: all}", "entry 0.*json_path"),
    ("datasets:\n  - {json_path: a.json}\n  - {json_path: b.json, sampling_strategy: 'top:3'}", "entry 1.*sampling_strategy"),
    ("datasets:\n  - {json_path: a.json, weight: 2}", "entry 0.*unknown keys"),
    ("datasets: [", "not valid YAML"),
])
def test_mixture_errors_name_file_and_entry(tmp_path, text, match):
    yml = tmp_path / "mix.yaml"
    yml.write_text(text)
    with pytest.raises(MixtureError, match=match) as info:
        load_mixture(yml)
    assert str(yml) in str(info.value)
