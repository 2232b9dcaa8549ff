"""CVSI end to end: the BLIP-2 captioner on a tiny random model, a killed run resuming from its caches,
answer-file import and test submissions (the synthetic demo: test_cvsi_demo.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import utils
import zero_shot_cvsi
from cvsi import demo
from cvsi.cache import JsonCache
from cvsi.captioner import Blip2Captioner, caption_images
from cvsi.llm import ChatClient, LLMError
from cvsi.loopback import LoopbackChatServer, chat_reply
from cvsi.phi import Phi, save_phi
from data_utils import build_transform, load_image
from dataset_registry import get_dataset
from metrics import circo_metrics
from model import create_backbone
from retrieval import topk_retrieval
from synthetic import make_synthetic_circo

transformers = pytest.importorskip("transformers")
CLIP = "ViT-Tiny-P8-32"


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory) -> Path:
    """A randomly initialised BLIP-2 (ViT, Q-Former, OPT: one layer each) saved with its processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "</s>", "<unk>", "<image>"] + "a an red blue green circle square triangle photo of and on".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                                     pad_token="<pad>", unk_token="<unk>")
    layer = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, image_size=30, patch_size=15, **layer),
        qformer_config=dict(hidden_size=32, encoder_hidden_size=32, vocab_size=50, **layer),
        text_config=transformers.OPTConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, ffn_dim=37,
                                           num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
                                           bos_token_id=1, eos_token_id=1, pad_token_id=0).to_dict(),
        num_query_tokens=4, image_token_index=words.index("<image>"),
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("blip2")
    transformers.Blip2ForConditionalGeneration(config).save_pretrained(path)
    image_processor = transformers.BlipImageProcessor(size={"height": 30, "width": 30})
    transformers.Blip2Processor(image_processor, tokenizer, num_query_tokens=4).save_pretrained(path)
    return path


def test_blip2_captioner_gives_n_seeded_captions_per_image(tiny_blip2, tmp_path):
    captioner = Blip2Captioner(str(tiny_blip2), num_captions=4, max_new_tokens=5, seed=0)
    images = [Image.new("RGB", (40, 40), (200, 30, 30)), Image.new("RGB", (48, 32), (30, 30, 200))]
    first = captioner.caption(images, seed=1)
    assert len(first) == 2 and all(len(c) == 4 and all(isinstance(t, str) and t for t in c) for c in first)
    assert captioner.caption(images, seed=1) == first
    assert captioner.caption(images, seed=2) != first
    assert not any("<image>" in t for c in first for t in c)  # the prompt (image tokens) is not in the caption

    calls = []
    original = captioner.caption
    captioner.caption = lambda batch, seed: calls.append(len(batch)) or original(batch, seed)
    keys = [f"img{i}" for i in range(5)]
    cache = JsonCache(tmp_path, "captions", captioner.identity())
    captions = caption_images(captioner, keys, lambda key: images[int(key[-1]) % 2], cache, batch_size=2)
    assert calls == [2, 2, 1] and all(len(captions[k]) == 4 for k in keys)
    again = caption_images(captioner, keys, lambda key: images[0], JsonCache(tmp_path, "captions", captioner.identity()))
    assert calls == [2, 2, 1] and again == captions  # everything came from the cache


@pytest.fixture(scope="module")
def circo_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("cvsi")
    root = make_synthetic_circo(base / "data", seed=0, num_val=8, num_test=4, gallery_size=40, image_size=32)
    torch.manual_seed(0)
    backbone = create_backbone(CLIP)
    phi = base / "phi.pt"
    save_phi(phi, Phi(backbone.embed_dim, backbone.text_width))
    gallery = json.loads((root / "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json").read_text())["images"]
    return base, root, phi, len(gallery)


def _args(root, phi, out, *extra):
    return ["--dataset", "circo", "--data_root", str(root), "--clip_model_name", CLIP, "--pretrained", "none",
            "--phi_checkpoint", str(phi), "--transform", "clip", "--cache_dir", str(out / "cache"),
            "--output_dir", str(out / "run"), "--batch_size", "16", *extra]


def test_killed_run_resumes_from_its_caches(circo_setup, tiny_blip2, tmp_path, monkeypatch):
    _, root, phi, gallery_size = circo_setup
    blip = ["--captioner", str(tiny_blip2), "--num_captions", "2", "--caption_max_tokens", "4",
            "--caption_batch_size", "8", "--llm_model", "synthetic-editor", "--llm_concurrency", "2"]
    caption_calls = []
    original_caption = Blip2Captioner.caption
    monkeypatch.setattr(Blip2Captioner, "caption",
                        lambda self, images, seed: caption_calls.append(len(images)) or original_caption(self, images, seed))
    original_complete = ChatClient.complete
    answered = []

    def dies_after_ten(self, messages, parse):
        if len(answered) >= 10:
            raise KeyboardInterrupt  # the run is killed while the LLM works
        answered.append(1)
        return original_complete(self, messages, parse)

    with LoopbackChatServer(demo.synthetic_editor) as server:
        url = ["--llm_base_url", server.base_url]
        monkeypatch.setattr(ChatClient, "complete", dies_after_ten)
        with pytest.raises(KeyboardInterrupt):
            zero_shot_cvsi.main(_args(root, phi, tmp_path, *blip, *url))
        assert sum(caption_calls) == gallery_size and server.requests == 10  # gallery captioned, 10 answers

        monkeypatch.setattr(ChatClient, "complete", original_complete)
        caption_calls.clear()
        first = zero_shot_cvsi.main(_args(root, phi, tmp_path, *blip, *url))["metrics"]["CVSI"]
        assert caption_calls == [] and server.requests > 10
        # Each query asks p_m once per distinct reference caption and p_a once; the 10 answered are not asked again.
        prompts = {json.dumps(body["messages"]) for body in server.bodies}
        assert len(prompts) == server.requests

        seen = server.requests
        second = zero_shot_cvsi.main(_args(root, phi, tmp_path, *blip, *url))["metrics"]["CVSI"]
        assert caption_calls == [] and server.requests == seen  # a repeated run costs nothing
        assert second == first and set(first) >= {"mAP@5", "mAP@10", "mAP@25", "mAP@50", "R@5"}

    # The answers the run exported import back (no LLM, no server) with the same result.
    exported = tmp_path / "run" / "llm_answers_circo_val_circo.json"
    assert json.loads(exported.read_text())["query_ids"] == [str(i) for i in range(8)]
    imported = zero_shot_cvsi.main(_args(root, phi, tmp_path, "--captioner", str(tiny_blip2), "--num_captions", "2",
                                         "--caption_max_tokens", "4", "--llm_answers_file", str(exported)))
    assert imported["metrics"]["CVSI"] == first


def test_llm_failures_stop_the_run_unless_allowed(circo_setup, tmp_path):
    _, root, phi, gallery_size = circo_setup
    captions = ["--captions_file", str(root / "image_captions" / "unlabeled2017.json"), "--num_captions", "2"]

    def flaky(request):
        reply = demo.synthetic_editor(request)
        return reply if "remove" not in request["messages"][0]["content"].rsplit("Instruction:", 1)[1] else \
            chat_reply("Edited Description:")  # malformed for every query that removes something

    with LoopbackChatServer(flaky) as server:
        llm = ["--llm_base_url", server.base_url, "--llm_model", "m", "--llm_retries", "1", "--llm_backoff", "0.01"]
        with pytest.raises(LLMError, match="LLM answers failed"):
            zero_shot_cvsi.main(_args(root, phi, tmp_path, *captions, *llm))
        failures = json.loads((tmp_path / "run" / "llm_failures_circo_val.json").read_text())
        assert failures and {"query_id", "kind", "index", "error"} == set(failures[0])
        queries = get_dataset("circo").tasks(root, "val")[0].queries
        removing = {q.query_id for q in queries if "remove" in q.caption}
        assert {f["query_id"] for f in failures} == removing and 0 < len(removing) < len(queries)
        requests = server.requests
        result = zero_shot_cvsi.main(_args(root, phi, tmp_path, *captions, *llm, "--on_llm_failure", "leave_out"))
        asked_again = {json.dumps(body["messages"]) for body in server.bodies[requests:]}
        assert len(asked_again) == len(failures)  # only the failed prompts are asked again (the rest is cached)
    # Exactly the failed parts (both p_m answers of the removing queries) are left out; the rest is kept.
    assert {f["kind"] for f in failures} == {"modified_caption"} and len(failures) == 2 * len(removing)
    exported = json.loads((tmp_path / "run" / "llm_answers_circo_val_circo.json").read_text())
    for qid, modified, added in zip(exported["query_ids"], exported["modified_captions"], exported["added_content"]):
        assert len(modified) == (0 if qid in removing else 2) and added
    assert set(result["metrics"]["CVSI"]) >= {"mAP@5", "mAP@10", "mAP@25", "mAP@50", "R@5"}


def test_test_split_writes_a_checked_circo_submission_and_ablations(circo_setup, tmp_path):
    _, root, phi, gallery_size = circo_setup
    captions = ["--captions_file", str(root / "image_captions" / "unlabeled2017.json")]
    with LoopbackChatServer(demo.synthetic_editor) as server:
        llm = ["--llm_base_url", server.base_url, "--llm_model", "m", "--caption_context", "joined"]
        files = zero_shot_cvsi.main(_args(root, phi, tmp_path, *captions, *llm, "--split", "test"))["files"]
        submission = json.loads(files[0].read_text())
        assert sorted(submission, key=int) == [str(i) for i in range(4)]
        expected = min(50, gallery_size)
        assert all(len(ids) == expected and len(set(ids)) == expected and all(isinstance(i, int) for i in ids)
                   for ids in submission.values())
        assert server.requests == 8  # 'joined': one p_m and one p_a per query
        rows = zero_shot_cvsi.main(_args(root, phi, tmp_path, *captions, *llm, "--ablations"))["metrics"]
    assert len(rows) == 8 and rows["w/o reference image features"] == rows["CVSI"]  # q_v has weight 0 on CIRCO
    # Image-only retrieval (q = q_v, t = t_v): no captions, no LLM, no Φ needed.
    image_only = zero_shot_cvsi.main(["--dataset", "circo", "--data_root", str(root), "--clip_model_name", CLIP,
                                      "--pretrained", "None", "--alpha", "0", "--beta", "0", "--drop", "semantic",
                                      "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "io")])
    assert image_only["metrics"]["CVSI"] == pytest.approx(_image_only_metrics(root))


def _image_only_metrics(root: Path) -> dict[str, float]:
    """CIRCO val metrics of q = f_v(reference), t = f_v(target), computed here without the pipeline."""
    task = get_dataset("circo").tasks(root, "val")[0]
    utils.set_seed(0)  # the run's seed: the same random CLIP weights
    backbone = create_backbone(CLIP).eval()
    transform = build_transform("targetpad", backbone.image_size)  # the option's default

    def encode(names):
        with torch.no_grad():
            images = torch.stack([transform(load_image(task.image_path(n))) for n in names])
            return torch.nn.functional.normalize(backbone.encode_image(images).embeds.float(), dim=-1)

    _, top = topk_retrieval(encode([q.reference for q in task.queries]), encode(task.gallery), 50)
    ranked = [[task.gallery[i] for i in row] for row in top.tolist()]
    return circo_metrics(ranked, [q.gt for q in task.queries], [q.target for q in task.queries],
                               [q.aspects for q in task.queries])


def test_fine_grained_features_are_recomputed_when_the_transform_changes(circo_setup, tmp_path, monkeypatch):
    _, root, phi, _ = circo_setup
    import cvsi.features as features
    calls = []
    original = features.encode_with_pseudo_words
    monkeypatch.setattr(features, "encode_with_pseudo_words", lambda *a, **k: calls.append(1) or original(*a, **k))
    captions = ["--captions_file", str(root / "image_captions" / "unlabeled2017.json"), "--num_captions", "2"]
    with LoopbackChatServer(demo.synthetic_editor) as server:
        llm = ["--llm_base_url", server.base_url, "--llm_model", "m"]

        def run(transform):
            calls.clear()
            args = _args(root, phi, tmp_path, *captions, *llm, "--drop", "q_m", "t_c")
            args[args.index("--transform") + 1] = transform
            return zero_shot_cvsi.main(args)["metrics"]["CVSI"]

        clip = run("clip")
        assert calls  # q_f computed
        assert run("clip") == clip and not calls  # ... then cached
        run("targetpad")
        assert calls  # other preprocessing of the reference images: q_f computed again, not read from the cache
    assert len(list((tmp_path / "cache" / "fine_grained_features").iterdir())) == 2


def test_image_features_are_recomputed_when_the_transform_code_changes(circo_setup, tmp_path, monkeypatch):
    _, root, _, _ = circo_setup
    import cvsi.features as features
    import cvsi.pipeline as pipeline
    encoded = []
    original = features.ImageFiles
    monkeypatch.setattr(features, "ImageFiles", lambda keys, *a: encoded.append(len(keys)) or original(keys, *a))
    args = ["--dataset", "circo", "--data_root", str(root), "--clip_model_name", CLIP, "--pretrained", "none",
            "--alpha", "0", "--beta", "0", "--drop", "semantic", "--cache_dir", str(tmp_path / "cache"),
            "--output_dir", str(tmp_path / "run")]
    first = zero_shot_cvsi.main(args)["metrics"]["CVSI"]
    assert encoded[-1] > 0
    zero_shot_cvsi.main(args)
    assert encoded[-1] == 0  # cached
    monkeypatch.setattr(pipeline, "TRANSFORM_REVISION", pipeline.TRANSFORM_REVISION + 1)
    assert zero_shot_cvsi.main(args)["metrics"]["CVSI"] == first  # same transform output here, ...
    assert encoded[-1] > 0  # ... but a new revision of its code is not trusted to give the cached features
    identities = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "image_features").glob("*/identity.json")]
    assert sorted(i["transform_revision"] for i in identities) == [pipeline.TRANSFORM_REVISION - 1,
                                                                   pipeline.TRANSFORM_REVISION]
