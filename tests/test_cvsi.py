"""CVSI building blocks: fusion, Φ, pseudo-word encoding, caches, imports, caption files, LLM client."""
from __future__ import annotations

import ast
import json
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cvsi.cache import CacheError, JsonCache, TensorCache, fingerprint
from cvsi.fusion import ABLATIONS, DATASET_PRESETS, Components, FusedRetrieval, FusionWeights, fuse_query, fuse_target
from cvsi.imports import QueryAnswers, match_answers, read_answer_files, read_caption_sets, write_answer_file
from cvsi.llm import ChatClient, ChatConfig, LLMError, LLMJob, MalformedAnswer, run_jobs
from cvsi.loopback import LoopbackChatServer, Reply, chat_reply
from cvsi.phi import Phi, PhiCheckpointError, load_phi, save_phi
from cvsi.prompts import build_messages, parse_added_objects, parse_edited_description
from cvsi.pseudo_tokens import encode_with_pseudo_words, fine_grained_prompt, placeholder_token_id
from data_utils import DataError
from dataset_registry import Query, RetrievalTask
from evaluation import evaluate
from model import create_backbone
from synthetic import CAPTIONS_DIR, SYNTHETIC_CAPTIONS_PER_IMAGE, make_synthetic_circo, make_synthetic_cirr, make_synthetic_fashioniq


REPO = Path(__file__).resolve().parents[1]


def test_cvsi_imports_no_training_no_plotting_and_no_script():
    scripts = {path.stem for path in REPO.glob("*.py") if 'if __name__ == "__main__"' in path.read_text()}
    assert {"zero_shot_cvsi", "train_phi", "train_cirr"} <= scripts
    forbidden = scripts | {"training", "viz"}
    for path in sorted((REPO / "cvsi").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            assert not [n for n in names if n.split(".")[0] in forbidden], f"{path.name} imports {names}"


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone("ViT-Tiny-P8-32").eval()


# ------------------------------------------------------------------------------------------ fusion, mAP
def test_fusion_matches_direct_computation():
    torch.manual_seed(0)
    q_m, q_f, q_v = (F.normalize(torch.randn(5, 8), dim=-1) for _ in range(3))
    t_c, t_v = (F.normalize(torch.randn(7, 8), dim=-1) for _ in range(2))
    for weights in (DATASET_PRESETS["circo"].weights, DATASET_PRESETS["fashioniq"].weights, FusionWeights(0.3, 0.3, 0.5)):
        a, b, g = weights.alpha, weights.beta, weights.gamma
        q = a * q_m + b * q_f + (1 - a - b) * q_v
        t = g * t_c + (1 - g) * t_v
        direct = torch.stack([torch.stack([torch.dot(qi, tj) / (qi.norm() * tj.norm()) for tj in t]) for qi in q])
        fused = (F.normalize(fuse_query(weights, q_m, q_f, q_v), dim=-1)
                 @ F.normalize(fuse_target(weights, t_c, t_v), dim=-1).T)  # cosine similarity, Eq. 10
        torch.testing.assert_close(fused, direct)
    # Dropping a component zeroes its weight; the query side of CIRCO has no q_v term at all.
    dropped = DATASET_PRESETS["circo"].weights.without(["q_m", "t_v"])
    assert dropped.query() == {"q_m": 0.0, "q_f": 0.4, "q_v": 0.0} and dropped.target()["t_v"] == 0.0
    torch.testing.assert_close(fuse_query(dropped, None, q_f, None), 0.4 * q_f)
    assert DATASET_PRESETS["circo"].weights.without(["visual"]).needed() == {"q_m", "t_c"}
    assert set(ABLATIONS["w/o semantic information extraction"]) == {"q_m", "t_c"}
    with pytest.raises(ValueError, match="alpha \\+ beta"):
        FusionWeights(0.7, 0.4, 0.2)
    with pytest.raises(ValueError, match="not computed"):
        fuse_query(DATASET_PRESETS["circo"].weights, None, q_f, q_v)


def test_cvsi_circo_map_on_a_hand_case_with_several_ground_truths():
    # One query; the fused scores rank the gallery g0 > g1 > ... > g5; ground truths g0, g2, g4.
    gallery = [f"g{i}" for i in range(6)]
    task = RetrievalTask("circo", "circo", "val", Path("."), gallery,
                         [Query("0", "ref", "T", target="g2", gt=["g0", "g2", "g4"], aspects=["addition"])],
                         lambda name: Path(name), [])
    image_only = FusedRetrieval("CVSI", FusionWeights(0.0, 0.0, 0.0),  # q = q_v, t = t_v
                                {"circo": Components(q_v=torch.tensor([[6.0, 5, 4, 3, 2, 1]]), t_v=torch.eye(6))})
    metrics = evaluate(image_only, [task], "circo")
    ap5 = (1 / 1 + 2 / 3 + 3 / 5) / 3  # P@i at each hit, over min(k, |GT|) = 3
    assert metrics["mAP@5"] == pytest.approx(100 * ap5)
    assert metrics["mAP@50"] == pytest.approx(100 * ap5)
    assert metrics["mAP@10_addition"] == pytest.approx(100 * ap5)
    assert metrics["R@5"] == 100.0  # the single target_img_id g2 is ranked 3rd


# ------------------------------------------------------------------------------------------ Φ
def test_phi_checkpoint_roundtrip_lincir_layout_and_mismatch(tmp_path, backbone):
    torch.manual_seed(0)
    phi = Phi(backbone.embed_dim, backbone.text_width).eval()
    assert [name for name, _ in phi.named_parameters()] == [
        "layers.0.weight", "layers.0.bias", "layers.3.weight", "layers.3.bias", "layers.6.weight", "layers.6.bias"]
    x = torch.randn(3, backbone.embed_dim)
    save_phi(tmp_path / "phi.pt", phi)
    torch.testing.assert_close(load_phi(tmp_path / "phi.pt", backbone.embed_dim, backbone.text_width)(x), phi(x))
    # LinCIR's file as written by a DDP-wrapped trainer.
    torch.save({"epoch": 3, "Phi": {f"module.{k}": v for k, v in phi.state_dict().items()}}, tmp_path / "ddp.pt")
    torch.testing.assert_close(load_phi(tmp_path / "ddp.pt", backbone.embed_dim, backbone.text_width)(x), phi(x))

    with pytest.raises(PhiCheckpointError, match="trained for a CLIP with embedding dim D=64 and text width w=64; "
                                                  "this backbone has D=768, w=1024"):
        load_phi(tmp_path / "phi.pt", 768, 1024)
    torch.save({"Phi": {"layers.0.weight": torch.zeros(2, 2)}}, tmp_path / "partial.pt")
    with pytest.raises(PhiCheckpointError, match="missing .*layers.6.bias"):
        load_phi(tmp_path / "partial.pt", backbone.embed_dim, backbone.text_width)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PhiCheckpointError, match="junk.pt: corrupt or not a weights-only checkpoint"):
        load_phi(tmp_path / "junk.pt", 64, 64)
    with pytest.raises(PhiCheckpointError, match="no such file"):
        load_phi(tmp_path / "missing.pt", 64, 64)


# ------------------------------------------------------------------------------------------ pseudo word
def test_pseudo_word_changes_only_the_placeholder_embedding(backbone, monkeypatch):
    placeholder = placeholder_token_id(backbone)
    assert placeholder == 259  # CLIP BPE "$"
    prompts = [fine_grained_prompt("make the circle blue", "a blue circle"), fine_grained_prompt("remove it.", None)]
    assert prompts == ["a photo of $ that make the circle blue. And the photo should have a blue circle.",
                       "a photo of $ that remove it."]
    ids = backbone.tokenize(prompts)
    dollar = backbone.embed_tokens(torch.tensor([placeholder]))[0]
    with torch.no_grad():
        # Φ output equal to the "$" word embedding: exactly the plain text encoding.
        same = encode_with_pseudo_words(backbone, prompts, dollar.expand(2, -1), placeholder)
        torch.testing.assert_close(same, backbone.encode_text(ids).embeds)

        seen = {}
        original = backbone.encode_text_embeddings

        def spy(words, token_ids):
            seen["words"] = words
            return original(words, token_ids)

        monkeypatch.setattr(backbone, "encode_text_embeddings", spy)
        pseudo = torch.randn(2, backbone.text_width)
        other = encode_with_pseudo_words(backbone, prompts, pseudo, placeholder)
    changed = (seen["words"] != backbone.embed_tokens(ids)).any(dim=-1)
    assert torch.equal(changed, ids == placeholder)
    torch.testing.assert_close(seen["words"][ids == placeholder], pseudo)
    assert not torch.allclose(other, same)
    with pytest.raises(ValueError, match="no '\\$' placeholder"):
        encode_with_pseudo_words(backbone, ["no placeholder here"], pseudo[:1], placeholder)


def test_encode_text_is_encode_text_embeddings_of_the_word_embeddings(backbone):
    ids = backbone.tokenize(["a red circle", "add a blue square and remove the triangle"])
    with torch.no_grad():
        plain = backbone.encode_text(ids)
        from_embeds = backbone.encode_text_embeddings(backbone.embed_tokens(ids), ids)
    torch.testing.assert_close(plain.embeds, from_embeds.embeds)
    torch.testing.assert_close(plain.tokens, from_embeds.tokens)
    with pytest.raises(ValueError, match="do not match"):
        backbone.encode_text_embeddings(backbone.embed_tokens(ids)[:, :2], ids)


# ------------------------------------------------------------------------------------------ caches
def test_caches_persist_across_instances_and_name_damaged_parts(tmp_path):
    identity = {"model": "m", "temperature": 0}
    cache = JsonCache(tmp_path, "answers", identity)
    cache.put({"a": "x"})
    cache.put({"b": ["y", "z"]})
    again = JsonCache(tmp_path, "answers", identity)
    assert again["a"] == "x" and again["b"] == ["y", "z"] and again.missing(["a", "c", "c"]) == ["c"]
    assert len(JsonCache(tmp_path, "answers", {**identity, "temperature": 1})) == 0  # another model: another cache
    assert json.loads((cache.directory / "identity.json").read_text()) == identity

    features = TensorCache(tmp_path, "features", identity)
    features.put({"k1": torch.ones(4), "k2": torch.zeros(4)})
    torch.testing.assert_close(TensorCache(tmp_path, "features", identity).stack(["k2", "k1"]),
                               torch.stack([torch.zeros(4), torch.ones(4)]))
    next(cache.directory.glob("part-*.json")).write_text("{truncated")
    with pytest.raises(CacheError, match="part-.*damaged"):
        JsonCache(tmp_path, "answers", identity)
    # A loadable tensor part that is not {"keys", "values"} is reported with its file name, not a TypeError.
    for bad in ([torch.ones(2, 4)], {"keys": 3, "values": torch.ones(2, 4)}):
        part = next(features.directory.glob("part-*.pt"))
        torch.save(bad, part)
        with pytest.raises(CacheError, match=f"{part.name}.*damaged"):
            TensorCache(tmp_path, "features", identity)
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})


# ------------------------------------------------------------------------------------------ caption files, imports
def test_synthetic_generators_write_caption_files(tmp_path):
    circo = make_synthetic_circo(tmp_path, seed=0, num_val=4, num_test=2, gallery_size=30, image_size=32)
    data = json.loads((circo / CAPTIONS_DIR / "unlabeled2017.json").read_text())
    info = json.loads((circo / "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json").read_text())
    assert data["index_names"] == [str(r["id"]) for r in info["images"]]
    assert all(len(c) == SYNTHETIC_CAPTIONS_PER_IMAGE for c in data["target_captions"])
    captions = read_caption_sets([circo / CAPTIONS_DIR / "unlabeled2017.json"], {}, {}).gallery
    assert any("circle" in c or "square" in c or "triangle" in c for c in next(iter(captions.values())))

    cirr = make_synthetic_cirr(tmp_path, seed=0, num_train=6, num_val=4, num_test=3, image_size=32)
    for split in ("val", "test1"):
        names = json.loads((cirr / f"cirr/image_splits/split.rc2.{split}.json").read_text())
        assert set(read_caption_sets([cirr / CAPTIONS_DIR / f"{split}.json"], {}, {}).gallery) == set(names)
    assert not (cirr / CAPTIONS_DIR / "train.json").exists()
    fiq = make_synthetic_fashioniq(tmp_path, seed=0, num_train_per_category=3, num_val_per_category=3,
                                   num_test_per_category=2, image_size=32)
    ids = json.loads((fiq / "image_splits/split.dress.val.json").read_text())
    dress = read_caption_sets([fiq / CAPTIONS_DIR / "dress.val.json"], {}, {}).gallery
    assert set(dress) == set(ids) and all("dress" in c for c in dress[ids[0]])
    # Captions come from their own random stream: deterministic, and a new seed changes them.
    again = make_synthetic_circo(tmp_path / "again", seed=0, num_val=4, num_test=2, gallery_size=30, image_size=32)
    assert (again / CAPTIONS_DIR / "unlabeled2017.json").read_bytes() == (circo / CAPTIONS_DIR / "unlabeled2017.json").read_bytes()


def test_answer_files_roundtrip_and_alignment(tmp_path):
    answers = [QueryAnswers(["a blue circle", "blue circle"], "a blue circle"), QueryAnswers(["a square"], None)]
    write_answer_file(tmp_path / "mine.json", ["7", "9"], ["make it blue", "remove the circle"], answers)
    lists = {"circo": (["7", "9"], ["make it blue", "remove the circle"])}
    assert match_answers(read_answer_files([tmp_path / "mine.json"]), lists) == {"7": answers[0], "9": answers[1]}
    # The release's layout: no ids, one modified caption (a list of one) per query, in dataset order.
    release = {"base_caption": [["c"], ["d"]], "instruction": ["make it blue", "remove the circle"],
               "modified_captions": [["a blue circle"], ["a square"]], "added_content": ["a blue circle", ""]}
    (tmp_path / "release.json").write_text(json.dumps(release))
    matched = match_answers(read_answer_files([tmp_path / "release.json"]), lists)
    assert matched["9"] == QueryAnswers(["a square"], None)
    release["instruction"].reverse()
    (tmp_path / "shuffled.json").write_text(json.dumps(release))
    with pytest.raises(DataError, match="match no query list"):
        match_answers(read_answer_files([tmp_path / "shuffled.json"]), lists)
    (tmp_path / "bad.json").write_text(json.dumps({"instruction": ["x"], "modified_captions": [], "added_content": []}))
    with pytest.raises(DataError, match="one length"):
        read_answer_files([tmp_path / "bad.json"])


# ------------------------------------------------------------------------------------------ LLM client
def test_answer_parsing_is_robust():
    assert parse_edited_description("Edited Description: a red square") == "a red square"
    assert parse_edited_description("**Edited Description:** \"two cats on a sofa\"\n\nExplanation: ...") == "two cats on a sofa"
    assert parse_edited_description("  a dog on a beach  ") == "a dog on a beach"
    assert parse_added_objects("Objects most likely added: [a crowd, a fence]") == "a crowd, a fence"
    for bad in ("", "Edited Description:   ", "Edited Description:\nInstruction: x"):
        with pytest.raises(MalformedAnswer):
            parse_edited_description(bad)


def _scripted(replies):
    """A responder returning ``replies`` in order (then the last one forever), thread-safe."""
    lock, queue = threading.Lock(), list(replies)

    def respond(request):
        with lock:
            return queue.pop(0) if len(queue) > 1 else queue[0]
    return respond


# Sent with the scripted 5xx answers: the openai client honours it instead of its own 0.5-8 s back-off.
_RETRY_SOON = {"retry-after-ms": "5"}


def _config(server, **kwargs):
    settings = dict(base_url=server.base_url, model="test", timeout=5.0, max_retries=6, backoff=0.01, max_backoff=0.05)
    return ChatConfig(**{**settings, **kwargs})


def test_client_survives_slow_answers_429_500_and_malformed_bodies():
    good = "Edited Description: a blue circle"
    replies = [
        Reply(delay=0.5, body=chat_reply(good).body),  # slower than the 0.25 s time-out
        Reply({"error": "rate limited"}, status=429, headers={"Retry-After": "0.05"}),
        Reply({"error": "boom"}, status=500, headers=_RETRY_SOON),
        Reply(b"<html>bad gateway</html>"),  # not JSON
        Reply({"choices": []}),  # JSON without an answer
        Reply([1, 2]),  # JSON, but not an object
        chat_reply("I cannot help with that. Edited Description:"),  # an empty answer
        chat_reply(good),
    ]
    with LoopbackChatServer(_scripted(replies)) as server:
        client = ChatClient(_config(server, timeout=0.25))
        answer = client.complete(build_messages("Edit.", "a red circle", "make the circle blue", "Edited Description:"),
                                 parse_edited_description)
        assert answer == "a blue circle"
        assert server.requests == len(replies)
        request = server.bodies[-1]
        assert request["temperature"] == 0 and request["model"] == "test"
        assert request["messages"][0]["content"].endswith("Instruction: make the circle blue\nEdited Description:")


def test_client_gives_up_and_does_not_retry_client_errors():
    with LoopbackChatServer(_scripted([Reply({"error": "down"}, status=503, headers=_RETRY_SOON)])) as server:
        with pytest.raises(LLMError, match="gave up after 3 attempts.*HTTP 503"):
            ChatClient(_config(server, max_retries=2)).complete([{"role": "user", "content": "x"}], str)
        assert server.requests == 3
    with LoopbackChatServer(_scripted([Reply({"error": "bad key"}, status=401)])) as server:
        with pytest.raises(LLMError, match="HTTP 401"):
            ChatClient(_config(server)).complete([{"role": "user", "content": "x"}], str)
        assert server.requests == 1


def test_run_jobs_records_malformed_answers_as_failures_and_caches_the_rest(tmp_path):
    def respond(request):
        caption = request["messages"][0]["content"].split("Image Content: ")[1].split("\n")[0]
        if caption == "broken":
            return chat_reply("Edited Description:")  # always malformed
        return Reply(chat_reply(f"Edited Description: {caption} edited").body, delay=0.02)

    captions = ["a", "b", "broken", "c", "d"]
    jobs = [LLMJob(f"q{i}", "modified_caption", 0, build_messages("Edit.", c, "T", "Edited Description:"),
                   parse_edited_description) for i, c in enumerate(captions)]
    with LoopbackChatServer(respond) as server:
        config = _config(server, max_retries=2, concurrency=3)
        cache = JsonCache(tmp_path, "llm", config.identity())
        answers, failures = run_jobs(ChatClient(config), jobs, cache, flush_every=2)
        assert [(f.query_id, f.kind) for f in failures] == [("q2", "modified_caption")]
        assert "malformed answer" in failures[0].error
        assert {answers[j.key] for j in jobs if j.key in answers} == {"a edited", "b edited", "c edited", "d edited"}
        assert jobs[2].key not in cache  # a failure is never stored, so the next run asks again
        first = server.requests
        again, failures = run_jobs(ChatClient(config), jobs, JsonCache(tmp_path, "llm", config.identity()))
        assert server.requests - first == 3  # only the failed job, with its retries
        assert again == answers and len(failures) == 1


def test_api_key_is_sent_but_kept_out_of_repr_cache_and_files(tmp_path):
    key = "sk-test-" + "k" * 24
    jobs = [LLMJob("q0", "modified_caption", 0, build_messages("Edit.", "a", "T", "Edited Description:"),
                   parse_edited_description)]
    with LoopbackChatServer(_scripted([chat_reply("Edited Description: b")])) as server:
        config = _config(server, api_key=key)
        cache = JsonCache(tmp_path, "llm", config.identity())
        answers, failures = run_jobs(ChatClient(config), jobs, cache)
        assert server.headers[0]["authorization"] == f"Bearer {key}"
    assert list(answers.values()) == ["b"] and not failures
    assert key not in repr(config) and key not in json.dumps(config.identity())
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert written and not any(key in path.read_text() for path in written)
