"""comp.recipes: the recipes are package data with one home per fact; a recipe file that
breaks a rule is refused with the file and the fix; the plan the bash scripts read holds
every stage with its starting point, mixture and flags."""
from __future__ import annotations

import pytest

from comp import recipes
from comp.errors import UserError
from comp.recipes.__main__ import main, plan_fields

STAGE1 = """\
export: null
stages:
  - name: stage1
    data: stage1.yaml
    start: null
    flags: {learning_rate: 1e-3, max_num_vistoken: 1024, force_resize: 384, use_rope: 0}
"""


def _pairs(flags: list[str]) -> dict[str, str]:
    assert len(flags) % 2 == 0 and all(f.startswith("--") for f in flags[::2]), flags
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert len(pairs) == len(flags) // 2, f"a flag is given twice: {flags}"
    return pairs


def test_package_recipes_load_with_their_mixtures():
    assert recipes.names() == ["comp_1b_comp_siglip", "comp_1b_siglip"]
    siglip = recipes.load_recipe("comp_1b_siglip")
    assert [(s.name, s.data, s.start) for s in siglip.stages] == [
        ("stage1", "stage1.yaml", None), ("stage2a", "stage2.yaml", "stage1"),
        ("stage2b", "stage2.yaml", "stage2a"), ("stage3", "stage3.yaml", "stage2b")]
    assert siglip.export == "stage3" and recipes.load_recipe("comp_1b_comp_siglip").export is None
    assert {p.name for p in recipes.DATA.glob("*.yaml")} == {"stage1.yaml", "stage2.yaml", "stage3.yaml",
                                                          "sources.yaml"}


def test_smoke_mode_scales_the_stage_flags_and_keeps_the_rest():
    stage = recipes.load_recipe("comp_1b_siglip").stages[1]  # Stage II-a
    gpu, smoke = _pairs(recipes.stage_flags(stage, "gpu")), _pairs(recipes.stage_flags(stage, "smoke"))
    assert (gpu["--per_device_train_batch_size"], smoke["--per_device_train_batch_size"]) == ("16", "2")
    assert (gpu["--max_num_vistoken"], smoke["--max_num_vistoken"]) == ("3000", "64")
    assert (gpu["--model_max_length"], smoke["--model_max_length"]) == ("8000", "1024")
    assert (gpu["--force_resize"], smoke["--force_resize"]) == ("1024", "128")  # divide: 8
    assert (gpu["--bf16"], smoke["--bf16"], smoke["--use_cpu"]) == ("True", "False", "True")
    for flag in ("--learning_rate", "--mm_projector_lr", "--use_rope", "--mm_tunable_parts",
                 "--gradient_accumulation_steps", "--lr_scheduler_type", "--dataloader_drop_last"):
        assert gpu[flag] == smoke[flag], flag
    assert gpu["--learning_rate"] == "2e-5" and gpu["--dataloader_drop_last"] == "True"


def test_plan_lists_every_stage_for_the_scripts(capsysbinary):
    fields = plan_fields("comp_1b_comp_siglip", "gpu")
    stages, i = [], 0
    while i < len(fields):
        assert fields[i] == "stage", fields[i:i + 3]
        n = int(fields[i + 4])
        stages.append((*fields[i + 1:i + 4], _pairs(fields[i + 5:i + 5 + n])))
        i += 5 + n
    assert [s[:3] for s in stages] == [("stage1", "stage1.yaml", ""), ("stage2", "stage2.yaml", "stage1"),
                                       ("stage3", "stage3.yaml", "stage2")]
    assert stages[0][3]["--use_rope"] == "1" and "--force_resize" not in stages[0][3]  # native from Stage I
    assert plan_fields("comp_1b_siglip", "smoke")[-2:] == ["export", "stage3"]
    assert main(["plan", "comp_1b_comp_siglip"]) == 0
    assert capsysbinary.readouterr().out.split(b"\0")[:-1] == [f.encode() for f in fields]


@pytest.mark.parametrize("text, message", [
    (STAGE1.replace("use_rope: 0", "output_dir: out"), "output_dir are set by the runner"),
    (STAGE1.replace("use_rope: 0", "weight_decay: 0.1"), "weight_decay also set in common.yaml"),
    (STAGE1.replace("start: null", "start: stage0"), "starts from 'stage0', not an earlier stage"),
    (STAGE1.replace("stage1.yaml", "stage9.yaml"), "no mixture 'stage9.yaml'"),
    (STAGE1.replace("export: null", "export: stage3"), "export 'stage3' is not one of them"),
    (STAGE1.replace("    start: null\n", ""), "expected the keys"),
    (STAGE1.replace("use_rope: 0", "use_rope: [0]"), "a flag's value must be a string"),
])
def test_a_broken_recipe_is_refused_naming_file_and_fix(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as err:
        recipes.load_recipe(path)
    assert str(path) in str(err.value) and err.value.fix


def test_own_recipe_file_and_unknown_names(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(STAGE1)
    (stage,) = recipes.load_recipe(path).stages
    assert _pairs(recipes.stage_flags(stage, "smoke"))["--force_resize"] == "48"
    with pytest.raises(UserError, match="choose one of comp_1b_comp_siglip, comp_1b_siglip"):
        recipes.load_recipe("comp_1b_nope")
    assert main(["show", "comp_1b_nope"]) == 2
    assert capsys.readouterr().err.startswith("comp.recipes: no recipe 'comp_1b_nope'")
