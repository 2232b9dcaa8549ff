"""CVSI as its release does it: presets, per-dataset prompt files, the release's LLM step and failure
fallback, BLIP-2 beam sampling with a prompt, the release's caption pickles, and paper vs release scoring."""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import zero_shot_cvsi
from cvsi.params import build_parser
from cvsi import demo
from cvsi.captioner import Blip2Captioner
from cvsi.fusion import DATASET_PRESETS, Components, FusedRetrieval, FusionWeights, fuse_target, ranking_target, scored_t_c
from cvsi.imports import read_caption_sets
from cvsi.llm import LLMError
from cvsi.loopback import LoopbackChatServer, Reply, chat_reply
from cvsi.phi import Phi, save_phi
from cvsi.presets import RELEASE_STOP, apply_preset
from cvsi.prompts import MODIFY_PROMPT, build_messages, parse_raw_answer, select_template
from data_utils import DataError
from dataset_registry import Query, RetrievalTask, get_dataset
from evaluation import evaluate
from model import create_backbone
from synthetic import CAPTIONS_DIR, make_synthetic_circo
from test_cvsi_pipeline import tiny_blip2  # noqa: F401 (fixture: a tiny random BLIP-2 on disk)

CLIP = "ViT-Tiny-P8-32"


# ------------------------------------------------------------------------------------------ presets
def _parse(*extra):
    return build_parser().parse_args(["--dataset", "circo", "--data_root", "x", *extra])


def test_presets_fill_only_the_options_left_unset():
    release = apply_preset(_parse("--preset", "release", "--scoring", "paper", "--llm_stop"))
    assert (release.caption_beams, release.top_p, release.caption_prompt) == (15, 0.9, "a photo of")
    assert (release.caption_context, release.llm_max_tokens, release.llm_answer, release.on_llm_failure) == \
        ("joined", 700, "raw", "release_fallback")
    assert release.scoring == "paper" and release.llm_stop == []  # given on the command line: kept
    paper = apply_preset(_parse())
    assert (paper.caption_beams, paper.caption_prompt, paper.caption_context, paper.llm_max_tokens, paper.llm_stop,
            paper.llm_answer, paper.on_llm_failure, paper.scoring) == (1, "", "each", 256, [], "parsed", "strict", "paper")
    assert apply_preset(_parse("--preset", "release")).llm_stop == list(RELEASE_STOP)


# ------------------------------------------------------------------------------------------ prompt files
# Stand-ins for the release's utils/prompt_templates.py: its constant names, our own words. The file
# would fail if it were executed.
_RELEASE_MODULE = '''
import module_that_does_not_exist
structural_modifier_prompt = """
Structural prompt.
"""
contextual_modifier_prompt = \'\'\'
Contextual prompt with \u201ccurly quotes\u201d.
\'\'\'
structural_modifier_prompt_fashion = "Fashion prompt."
re_and_add_prompt: str = "Objects prompt."
short_modifier_prompt = "Short prompt."
not_a_prompt = 3
'''
DATASETS = sorted(DATASET_PRESETS)


def test_per_dataset_templates_from_the_release_module_and_text_files(tmp_path):
    module = tmp_path / "prompt_templates.py"
    module.write_text(_RELEASE_MODULE, encoding="utf-8")
    mine = tmp_path / "cirr.txt"
    mine.write_text("My CIRR prompt.\n", encoding="utf-8")

    def pick(specs, dataset, role="modify"):
        return select_template(specs, dataset, role, MODIFY_PROMPT, DATASETS)

    assert pick([str(module)], "circo") == "\nStructural prompt.\n"
    assert pick([str(module)], "cirr") == "\nContextual prompt with \u201ccurly quotes\u201d.\n"
    assert pick([str(module)], "fashioniq") == "Fashion prompt."
    assert all(pick([str(module)], d, "objects") == "Objects prompt." for d in DATASETS)
    assert pick([f"{module}:short_modifier_prompt"], "cirr") == "Short prompt."
    # A dataset's own entry wins over the entry for every dataset; entries for other datasets are ignored.
    both = [str(module), f"cirr={mine}"]
    assert pick(both, "cirr") == "My CIRR prompt.\n" and pick(both, "circo") == "\nStructural prompt.\n"
    assert pick([f"cirr={mine}"], "circo") == MODIFY_PROMPT and pick([], "circo") == MODIFY_PROMPT

    with pytest.raises(DataError, match="no string constant 'nope' .*re_and_add_prompt"):
        pick([f"{module}:nope"], "circo")
    with pytest.raises(DataError, match="unknown dataset 'cirq'"):
        pick([f"cirq={mine}"], "cirr")
    with pytest.raises(DataError, match="both apply to every dataset"):
        pick([str(mine), str(module)], "cirr")
    with pytest.raises(DataError, match="missing.txt: cannot read"):
        pick([str(tmp_path / "missing.txt")], "cirr")

    # The message is the template verbatim followed by the query, as the release builds it.
    template, captions = pick([str(module)], "cirr"), ["a dog", "a dog on grass"]
    message = build_messages(template, ", ".join(captions), "make it a cat", "Edited Description:")
    assert message == [{"role": "user", "content": template + "\nImage Content: a dog, a dog on grass"
                                                             "\nInstruction: make it a cat\nEdited Description:"}]
    assert parse_raw_answer("  two cats on grass \n") == "two cats on grass"
    with pytest.raises(ValueError, match="empty answer"):
        parse_raw_answer(" \n ")


# ------------------------------------------------------------------------------------------ pipeline fixtures
@pytest.fixture(scope="module")
def circo(tmp_path_factory):
    base = tmp_path_factory.mktemp("cvsi_release")
    root = make_synthetic_circo(base / "data", seed=0, num_val=6, num_test=2, gallery_size=30, image_size=32)
    torch.manual_seed(0)
    backbone = create_backbone(CLIP)
    phi = base / "phi.pt"
    save_phi(phi, Phi(backbone.embed_dim, backbone.text_width))
    return root, phi


def _args(root, phi, out, *extra):
    return ["--dataset", "circo", "--data_root", str(root), "--clip_model_name", CLIP, "--pretrained", "none",
            "--phi_checkpoint", str(phi), "--transform", "clip", "--cache_dir", str(out / "cache"),
            "--output_dir", str(out / "run"), "--batch_size", "16", *extra]


def _instruction(request):
    return request["messages"][0]["content"].rsplit("Instruction: ", 1)[1].split("\n", 1)[0]


# ------------------------------------------------------------------------------------------ LLM step
def test_release_llm_step_raw_answers_and_fallback_to_reference_captions(circo, tmp_path):
    root, phi = circo
    gallery_file = root / CAPTIONS_DIR / "unlabeled2017.json"
    gallery_captions = json.loads(gallery_file.read_text())
    captions_of = {name: captions[:3] for name, captions in zip(gallery_captions["index_names"],
                                                                gallery_captions["target_captions"])}
    queries = get_dataset("circo").tasks(root, "val")[0].queries
    failing = {q.caption for q in queries if "remove" in q.caption}
    assert 0 < len(failing) < len(queries)

    def respond(request):
        if _instruction(request) in failing:
            # retry-after-ms: the openai client's own back-off would wait ~0.5 s before its one retry
            return Reply({"error": "overloaded"}, status=500, headers={"retry-after-ms": "5"})
        if request["messages"][0]["content"].endswith("Objects most likely added:"):
            return chat_reply(" [a red square]\n")
        return chat_reply("  a red square and a blue circle \n")  # no marker: the raw answer is used

    key = "sk-release-test-" + "k" * 20
    common = ["--captions_file", str(gallery_file), "--num_captions", "3", "--llm_model", "m", "--llm_retries", "1",
              "--llm_api_key", key]
    with LoopbackChatServer(respond) as server:
        common += ["--llm_base_url", server.base_url]
        with pytest.raises(LLMError, match="LLM answers failed"):  # the paper preset stops on failures
            zero_shot_cvsi.main(_args(root, phi, tmp_path / "strict", *common))
        first = server.requests
        result = zero_shot_cvsi.main(_args(root, phi, tmp_path, *common, "--preset", "release"))
        bodies = server.bodies[first:]
        assert all(headers["authorization"] == f"Bearer {key}" for headers in server.headers)
    assert set(result["metrics"]["CVSI"]) >= {"mAP@5", "mAP@10"}
    assert all(b["temperature"] == 0 and b["max_tokens"] == 700 and b["stop"] == list(RELEASE_STOP) for b in bodies)
    # 'joined': one p_m and one p_a per query, on the reference's captions joined by commas.
    answered = [b for b in bodies if _instruction(b) not in failing]
    assert len(answered) == 2 * (len(queries) - sum(q.caption in failing for q in queries))
    for query in queries:
        if query.caption not in failing:
            expected_end = (f"\nImage Content: {', '.join(captions_of[query.reference])}\nInstruction: {query.caption}"
                            "\nEdited Description:")
            assert sum(b["messages"][0]["content"].endswith(expected_end) for b in answered) == 1

    exported = json.loads((tmp_path / "run" / "llm_answers_circo_val_circo.json").read_text())
    for query, modified, added in zip(queries, exported["modified_captions"], exported["added_content"]):
        if query.caption in failing:  # the release's fallback: the reference captions, no objects
            assert modified == captions_of[query.reference] and added == ""
        else:
            assert modified == ["a red square and a blue circle"] and added == "[a red square]"
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(written) > 10 and not any(key.encode() in path.read_bytes() for path in written)  # outputs and caches


# ------------------------------------------------------------------------------------------ captioning
def test_release_captioning_samples_within_beams_and_continues_the_prompt(tiny_blip2, monkeypatch):  # noqa: F811
    captioner = Blip2Captioner(str(tiny_blip2), num_captions=3, num_beams=3, top_p=0.9, max_new_tokens=4,
                               prompt="a photo of")
    seen = []
    original = captioner.model.generate
    monkeypatch.setattr(captioner.model, "generate", lambda **kw: seen.append(kw) or original(**kw))
    images = [Image.new("RGB", (40, 40), (200, 30, 30)), Image.new("RGB", (48, 32), (30, 30, 200))]
    captions = captioner.caption(images, seed=3)
    assert len(captions) == 2 and all(len(c) == 3 and all(c) for c in captions)
    call = seen[0]
    assert (call["do_sample"], call["num_beams"], call["top_p"], call["num_return_sequences"]) == (True, 3, 0.9, 3)
    prompt_ids = captioner.processor.tokenizer("a photo of", add_special_tokens=False)["input_ids"]
    assert call["input_ids"][:, -len(prompt_ids):].tolist() == [prompt_ids] * 2  # the model continues the prompt

    # Re-stated: generate under the same seed, drop the prompt tokens, decode.
    inputs = captioner.processor(images=images, text=["a photo of"] * 2, return_tensors="pt")
    torch.manual_seed(3)
    output = original(**inputs, do_sample=True, top_p=0.9, num_beams=3, num_return_sequences=3, max_new_tokens=4,
                      min_new_tokens=1)
    texts = [t.strip() for t in captioner.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:],
                                                                 skip_special_tokens=True)]
    assert captions == [texts[:3], texts[3:]]
    assert captioner.identity()["num_beams"] == 3 and captioner.identity()["prompt"] == "a photo of"
    with pytest.raises(ValueError, match="at most num_beams=3 captions"):
        Blip2Captioner(str(tiny_blip2), num_captions=4, num_beams=3)


def test_release_preset_builds_the_captioner_as_the_release(circo, tiny_blip2, tmp_path, monkeypatch):  # noqa: F811
    root, phi = circo
    import cvsi.semantics as semantics
    built = {}

    class Stop(Exception):
        pass

    def record(name, **kwargs):
        built.update(kwargs)
        raise Stop

    monkeypatch.setattr(semantics, "Blip2Captioner", record)
    with pytest.raises(Stop):
        zero_shot_cvsi.main(_args(root, phi, tmp_path, "--captioner", str(tiny_blip2), "--preset", "release",
                                  "--alpha", "0", "--beta", "0"))
    assert (built["num_captions"], built["num_beams"], built["top_p"], built["prompt"]) == (15, 15, 0.9, "a photo of")


# ------------------------------------------------------------------------------------------ caption pickles
def _release_gallery_pickle(path: Path, names: list[str], captions: list[list[str]], batch_size: int) -> None:
    """The release's gallery caption file, re-stated: per batch, its names are appended once per image."""
    index_names, target_captions = [], []
    for start in range(0, len(names), batch_size):
        batch = names[start:start + batch_size]
        for i in range(len(batch)):
            index_names.extend(batch)
            target_captions.append(captions[start + i])
    path.write_bytes(pickle.dumps({"target_captions": target_captions, "index_names": index_names}))


def test_release_gallery_pickle_names_are_recovered_or_taken_in_gallery_order(tmp_path):
    names = [f"{1000 + i}" for i in range(7)]
    captions = [[f"caption {i} {j}" for j in range(2)] for i in range(7)]
    _release_gallery_pickle(tmp_path / "gallery.pkl", names, captions, batch_size=3)
    raw = pickle.loads((tmp_path / "gallery.pkl").read_bytes())
    assert len(raw["index_names"]) == 3 * 3 + 3 * 3 + 1 * 1  # Σ b² for batches of 3, 3, 1
    order = {"circo": list(reversed(names))}  # another order: the recovered names, not the order, decide
    sets = read_caption_sets([tmp_path / "gallery.pkl"], order, {})
    assert sets.gallery == dict(zip(names, captions))

    # Names that follow no batch pattern: the captions are in the order of the one gallery of that size.
    broken = {"target_captions": captions, "index_names": names[::-1] + names}
    (tmp_path / "broken.pkl").write_bytes(pickle.dumps(broken))
    galleries = {"dress": names[:3], "shirt": names}
    assert read_caption_sets([tmp_path / "broken.pkl"], galleries, {}).gallery == dict(zip(names, captions))
    with pytest.raises(DataError, match="broken.pkl: 'index_names' does not name its 7 caption lists, and no gallery"):
        read_caption_sets([tmp_path / "broken.pkl"], {"dress": names[:3]}, {})
    with pytest.raises(DataError, match="more than one gallery"):
        read_caption_sets([tmp_path / "broken.pkl"], {"a": names, "b": names}, {})
    # Only plain data is unpickled: nothing that needs a class (which could run code).
    (tmp_path / "object.pkl").write_bytes(pickle.dumps({"index_names": [Path("x")], "target_captions": [["c"]]}))
    with pytest.raises(DataError, match="object.pkl: not a readable caption pickle .*pathlib"):
        read_caption_sets([tmp_path / "object.pkl"], {}, {})


def test_reference_and_gallery_captions_are_separate_sets(tmp_path):
    gallery = {"g1": ["g1 as a gallery image"], "g4": ["g4 as a gallery image"]}
    (tmp_path / "gallery.json").write_text(json.dumps({"index_names": list(gallery),
                                                       "target_captions": list(gallery.values())}))
    # The release's query-side file: one caption list per query, in query order; g1 is the reference of
    # two queries and was captioned twice.
    per_query = {"all_captions": [["g1 first sample"], ["g4 sample"], ["g1 second sample"]],
                 "gt_img_ids": [], "relative_captions": ["T0", "T1", "T2"], "target_names": ["g4", "g1", "g4"],
                 "reference_names": ["g1", "g4", "g1"], "query_ids": ["0", "1", "2"]}
    (tmp_path / "queries.pkl").write_bytes(pickle.dumps(per_query))
    query_lists = {"circo": (["0", "1", "2"], ["g1", "g4", "g1"])}
    sets = read_caption_sets([tmp_path / "gallery.json", tmp_path / "queries.pkl"], {}, query_lists)
    assert sets.gallery == gallery
    assert [sets.reference(q, r) for q, r in zip(*query_lists["circo"])] == per_query["all_captions"]
    assert sets.reference("9", "g4") == ["g4 as a gallery image"]  # no reference-role captions: the gallery's
    # Not in query order, the file is read by name, where g1's two lists conflict.
    with pytest.raises(DataError, match="image g1 is listed twice with other captions"):
        read_caption_sets([tmp_path / "queries.pkl"], {}, {"circo": (["0", "1", "2"], ["g4", "g1", "g1"])})


@pytest.mark.slow  # the whole zero-shot pipeline
def test_pipeline_uses_release_pickles_in_their_roles(circo, tmp_path):
    root, phi = circo
    data = json.loads((root / CAPTIONS_DIR / "unlabeled2017.json").read_text())
    task = get_dataset("circo").tasks(root, "val")[0]
    assert data["index_names"] == task.gallery
    _release_gallery_pickle(tmp_path / "gallery.pkl", task.gallery, data["target_captions"], batch_size=4)
    reference_lists = [[f"reference sample {i} of {q.reference}"] for i, q in enumerate(task.queries)]
    (tmp_path / "queries.pkl").write_bytes(pickle.dumps({
        "all_captions": reference_lists, "reference_names": [q.reference for q in task.queries],
        "relative_captions": [q.caption for q in task.queries], "query_ids": [q.query_id for q in task.queries]}))

    def run(out, *files):
        with LoopbackChatServer(demo.synthetic_editor) as server:
            result = zero_shot_cvsi.main(_args(root, phi, out, "--captions_file", *map(str, files), "--llm_model", "m",
                                               "--llm_base_url", server.base_url, "--caption_context", "joined"))
            return result["metrics"]["CVSI"], [b["messages"][0]["content"] for b in server.bodies]

    plain, _ = run(tmp_path / "plain", root / CAPTIONS_DIR / "unlabeled2017.json")
    quirky, _ = run(tmp_path / "quirky", tmp_path / "gallery.pkl")
    assert quirky == plain  # the Σ b² names are undone: the same t_c for every gallery image
    _, prompts = run(tmp_path / "roles", tmp_path / "gallery.pkl", tmp_path / "queries.pkl")
    for query, lists in zip(task.queries, reference_lists):  # the LLM saw each query's own reference captions
        assert any(f"Image Content: {lists[0]}\nInstruction: {query.caption}\n" in p for p in prompts)


# ------------------------------------------------------------------------------------------ scoring
def _unit(degrees: float) -> torch.Tensor:
    return torch.tensor([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))])


def test_paper_and_release_scoring_rank_a_hand_made_case_differently():
    # One query q_v = (1, 0); gallery A: t_v along q, captions pointing ±80° (t_c = their mean, norm 0.17);
    # gallery B: t_v and its captions at 53°. Target weights γ = 0.5 (query: q_v only).
    weights = FusionWeights(0.0, 0.0, 0.5)
    q_v = _unit(0)[None]
    t_c = torch.stack([torch.stack([_unit(80), _unit(-80)]).mean(0), _unit(53.13)])
    t_v = torch.stack([_unit(0), _unit(53.13)])

    def fused(t_c_row):
        return 0.5 * t_c_row + 0.5 * t_v

    # By hand: cosine prefers A (t_A is along q); the dot product with the unnormalised t prefers B
    # (|t_A| = 0.59 < 0.6 = q·t_B); re-normalising t_c (the release on FashionIQ) makes t_A = (1, 0) again.
    cosine = [F.cosine_similarity(q_v, row[None]).item() for row in fused(t_c)]
    dot = [(q_v @ row).item() for row in fused(t_c)]
    dot_unit_t_c = [(q_v @ row).item() for row in fused(F.normalize(t_c, dim=-1))]
    assert cosine[0] > cosine[1] and dot[0] < dot[1] and dot_unit_t_c[0] > dot_unit_t_c[1]

    def best(scoring, dataset):
        unit = DATASET_PRESETS[dataset].release_unit_t_c
        t = ranking_target(fuse_target(weights, scored_t_c(t_c, scoring, unit), t_v), scoring)
        return (F.normalize(q_v, dim=-1) @ t.T).argmax().item()

    assert [best("paper", d) for d in ("circo", "cirr", "fashioniq")] == [0, 0, 0]
    assert [best("release", d) for d in ("circo", "cirr", "fashioniq")] == [1, 1, 0]
    torch.testing.assert_close(scored_t_c(t_c, "paper", True), t_c)  # Eq. 7: the mean, as it is

    # The metric code sees the same difference: the ground truth A is ranked 1st (AP 1) or 2nd (AP 1/2).
    task = RetrievalTask("circo", "circo", "val", Path("."), ["A", "B"], [Query("0", "ref", "T", "A", ["A"], [])],
                         lambda name: Path(name), [])
    components = {"circo": Components(q_v=q_v, t_c=t_c, t_v=t_v)}
    for scoring, expected in (("paper", 100.0), ("release", 50.0)):
        method = FusedRetrieval("CVSI", weights, components, scoring)
        assert evaluate(method, [task], "circo")["mAP@5"] == pytest.approx(expected)
