"""The lmms-eval plugin (model ``comp``): helpers, registration, and a tiny local task run
through ``python -m lmms_eval`` whose scores are known from the model's own outputs.

Needs the optional extra: ``pip install -e .[eval]`` (skipped without lmms-eval)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance, unwrap_generation_output  # noqa: E402
from transformers import Qwen2ForCausalLM  # noqa: E402

from comp import CompForConditionalGeneration, CompProcessor  # noqa: E402
from comp.eval import lmms_plugin  # noqa: E402
from comp.tokens import stop_ids  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow"]
GEN_UNTIL = ["\n\n", "dad"]
GEN_MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def direct(tiny_mm_dir):
    """The oracle: the saved model used directly, one prompt at a time, no padding. The
    plugin-vs-oracle checks run in the inplace prompt format: the tiny random model's answers
    after the default system turn are too alike for the mix-up checks (the reference format
    itself is checked in test_reference_format.py)."""
    return (CompForConditionalGeneration.from_pretrained(tiny_mm_dir).eval(),
            CompProcessor.from_pretrained(tiny_mm_dir, prompt_format="inplace"))


def _prompt(processor, text: str, num_images: int) -> str:
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


# ----------------------------------------------------------------------------- helpers


def test_user_content_places_images_at_matching_markers():
    assert lmms_plugin.user_content("A <image> B <image>", 2) == [  # reference: images first
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "A  B "}]
    assert lmms_plugin.user_content("A <image> B <image>", 2, "inplace") == [
        {"type": "text", "text": "A "}, {"type": "image"}, {"type": "text", "text": " B "}, {"type": "image"}]
    assert lmms_plugin.user_content("<image>\nQ?", 2) == [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "\nQ?"}]
    assert lmms_plugin.user_content("Q?", 0) == [{"type": "text", "text": "Q?"}]


def test_generation_settings_default_to_greedy():
    kw, until = lmms_plugin.generation_settings({"until": "\n", "max_new_tokens": 7, "temperature": 0})
    assert kw == {"max_new_tokens": 7, "do_sample": False, "temperature": 1.0, "top_p": 1.0} and until == ["\n"]
    kw, until = lmms_plugin.generation_settings({"temperature": 0.7, "top_p": 0.9})
    assert kw["do_sample"] and kw["temperature"] == 0.7 and kw["top_p"] == 0.9 and until == []
    assert kw["max_new_tokens"] == lmms_plugin.DEFAULT_MAX_NEW_TOKENS
    assert lmms_plugin.generation_settings({"do_sample": True})[0]["do_sample"]
    with pytest.raises(ValueError, match="until"):
        lmms_plugin.generation_settings({"until": 3})


def test_cut_at_first_stop_string():
    assert lmms_plugin.cut_at("abc. def\n\nghi", ["\n\n", "."]) == "abc"
    assert lmms_plugin.cut_at("abc", ["x"]) == "abc"


def test_batches_group_settings_and_sort_longest_first():
    contexts = ["aa", "a", "aaaa", "aaa", "b"]
    kwargs = [{"t": 0}, {"t": 0}, {"t": 1}, {"t": 0}, {"t": 0}]
    assert lmms_plugin.batches_by_settings(contexts, kwargs, 2) == [[3, 0], [1, 4], [2]]


def test_as_images_accepts_pil_paths_and_nesting(tmp_path):
    Image.new("L", (5, 4)).save(tmp_path / "g.png")
    images = lmms_plugin.as_images([Image.new("RGBA", (3, 3)), [str(tmp_path / "g.png")], None])
    assert [im.mode for im in images] == ["RGB", "RGB"] and images[1].size == (5, 4)
    with pytest.raises(TypeError, match="video or audio"):
        lmms_plugin.as_images([b"bytes"])


def test_import_comp_does_not_import_lmms_eval():
    code = "import sys, comp, comp.eval; print(any(m.startswith('lmms_eval') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_comp_is_registered_through_the_entry_point():
    declared = {ep.name: ep.value for ep in entry_points(group="lmms_eval.models")}
    assert declared.get("comp") == "comp.eval.lmms_plugin:manifest", (
        "the installed comp distribution does not declare the lmms-eval entry point; pyproject.toml "
        "needs [project.entry-points.\"lmms_eval.models\"] comp = \"comp.eval.lmms_plugin:manifest\", "
        "then reinstall: pip install -e .[eval]")
    from lmms_eval.models import get_model
    assert get_model("comp") is lmms_plugin.CompLMMS


# ----------------------------------------------------------------------------- loglikelihood


def test_loglikelihood_equals_qwen2_on_text(tiny_mm_dir, tiny_dir, direct):
    """Text-only scoring against transformers' own Qwen2 (the LLM the CoMP-MM was built from);
    the plugin reports negative log-likelihoods, lmms-eval's multiple_choice convention."""
    lm = lmms_plugin.CompLMMS(pretrained=str(tiny_mm_dir), device="cpu", prompt_format="inplace")
    lm.task_dict = {"t": {"test": [{"q": "Is it red?"}]}}
    processor = direct[1]
    context = "Is it red?"
    greedy_ids = direct[0].generate(**processor(_prompt(processor, context, 0)), max_new_tokens=3,
                                    eos_token_id=-1)[0, -3:]
    greedy = processor.decode(greedy_ids)
    assert processor.tokenizer(greedy, add_special_tokens=False)["input_ids"] == greedy_ids.tolist()
    requests = [Instance("loglikelihood", (context, cont, lambda doc: None, 0, "t", "test"), idx=0,
                         metadata={"task": "t", "doc_id": 0, "repeats": 1})
                for cont in (greedy, " blue red")]
    responses = [unwrap_generation_output(r)[0] for r in lm.loglikelihood(requests)]  # as the evaluator does
    (nll_greedy, is_greedy), (nll_other, other_greedy) = responses
    assert is_greedy and not other_greedy and nll_greedy < nll_other

    reference = Qwen2ForCausalLM.from_pretrained(tiny_dir("qwen2")).eval()
    reference.resize_token_embeddings(len(processor.tokenizer))  # the CoMP-MM's rows, as the reference resizes
    prompt_ids = processor(_prompt(processor, context, 0))["input_ids"]
    for cont, nll in ((greedy, nll_greedy), (" blue red", nll_other)):
        cont_ids = processor.tokenizer(cont, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = reference(torch.cat([prompt_ids, cont_ids], 1)).logits[0]
        expected = logits[-cont_ids.shape[1] - 1:-1].log_softmax(-1).gather(-1, cont_ids[0, :, None]).sum()
        assert nll == pytest.approx(-float(expected), abs=1e-4)


# ----------------------------------------------------------------------------- end to end


def _images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    sizes = [(56, 84), (112, 56), (70, 70), (90, 140), (60, 200)]
    return [Image.fromarray(torch.randint(0, 256, (*s, 3), generator=g, dtype=torch.uint8).numpy())
            for s in sizes]


UTILS_PY = '''from PIL import Image


def doc_to_visual(doc):
    return [Image.open(p).convert("RGB") for p in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
'''

GEN_YAML = '''task: comp_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  until: {until}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
'''

MC_YAML = '''task: comp_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: {choices}
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
'''


def _direct_generation(model, processor, question: str, images: list[Image.Image]) -> str:
    inputs = processor(_prompt(processor, question, len(images)), images=images or None)
    ids = model.generate(**inputs, max_new_tokens=GEN_MAX_NEW_TOKENS, eos_token_id=stop_ids(processor.tokenizer))
    text = processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    for stop in GEN_UNTIL:
        text = text.split(stop)[0]
    return text.strip()


def _direct_choice_logits(model, processor, question: str, images: list[Image.Image]) -> torch.Tensor:
    """Next-token logits of the single-token choices " red", " green", ... after the prompt."""
    ids = [processor.tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in COLOURS]
    assert all(len(i) == 1 for i in ids), "the choices must be single tokens for this oracle"
    with torch.no_grad():
        logits = model(**processor(_prompt(processor, question, len(images)), images=images or None)).logits
    return logits[0, -1, [i[0] for i in ids]]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, direct):
    """Two local tasks whose expected scores follow from the model's own direct outputs:
    comp_tiny_gen targets the direct answer on even docs (exact_match = 4/7), comp_tiny_mc
    the most likely choice on all docs but the last, which gets the least likely (acc = 3/4)."""
    root = tmp_path_factory.mktemp("lmms_tasks")
    images = _images()
    for i, im in enumerate(images):
        im.save(root / f"{i}.png")
    path = [str(root / f"{i}.png") for i in range(len(images))]
    model, processor = direct
    gen_docs = [("the red image", [0]), ("Is it blue?", [1]), ("the red image", [2]), ("the red image", [3]),
                ("Is it blue?", []), ("Compare them.", [0, 2]), ("the red image", [4])]
    gen_rows = []
    for k, (question, idx) in enumerate(gen_docs):
        answer = _direct_generation(model, processor, question, [images[i] for i in idx])
        gen_rows.append({"question": question, "images": [path[i] for i in idx], "direct": answer,
                         "answer": answer if k % 2 == 0 else "not the model's answer"})
    mc_rows = []
    for k, (question, idx) in enumerate([("Which colour?", [0]), ("Colour of the image?", [1]),
                                         ("What colour?", [3]), ("Which colour?", [2, 4])]):
        logits = _direct_choice_logits(model, processor, question, [images[i] for i in idx])
        label = int(logits.argmin() if k == 3 else logits.argmax())
        mc_rows.append({"question": question, "images": [path[i] for i in idx], "label": label})
    (root / "gen.json").write_text(json.dumps(gen_rows))
    (root / "mc.json").write_text(json.dumps(mc_rows))
    (root / "utils.py").write_text(UTILS_PY)
    (root / "comp_tiny_gen.yaml").write_text(GEN_YAML.format(
        data=root / "gen.json", max_new_tokens=GEN_MAX_NEW_TOKENS, until=json.dumps(GEN_UNTIL)))
    (root / "comp_tiny_mc.yaml").write_text(MC_YAML.format(data=root / "mc.json", choices=json.dumps(COLOURS)))
    return root, gen_rows


def test_lmms_eval_cli_scores_a_local_task(tiny_mm_dir, tasks, tmp_path):
    root, gen_rows = tasks
    assert len({r["direct"] for r in gen_rows}) >= 3  # the answers differ, so mix-ups would show
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "comp", "--model_args", f"pretrained={tiny_mm_dir},prompt_format=inplace",
           "--tasks", "comp_tiny_gen,comp_tiny_mc", "--include_path", str(root), "--batch_size", "3",
           "--output_path", str(tmp_path / "out"), "--log_samples"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    found = list((tmp_path / "out").rglob("*_results.json"))  # lmms-eval exits 0 on errors too
    assert run.returncode == 0 and len(found) == 1, run.stdout[-3000:] + run.stderr[-3000:]
    results_file = found[0]
    results = json.loads(results_file.read_text())["results"]
    assert results["comp_tiny_gen"]["exact_match,none"] == pytest.approx(4 / 7)
    assert results["comp_tiny_mc"]["acc,none"] == pytest.approx(3 / 4)
    [samples_file] = (tmp_path / "out").rglob("*_samples_comp_tiny_gen.jsonl")
    samples = sorted(map(json.loads, samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["filtered_resps"] for s in samples] == [r["direct"] for r in gen_rows]
