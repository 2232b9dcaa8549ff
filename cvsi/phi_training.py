"""Training Φ from text alone, as LinCIR does (Gu et al., "Language-only Training of Zero-shot Composed
Image Retrieval", CVPR 2024: self-masking projection), for any open_clip backbone.

Φ is meant to map a CLIP *image* embedding to a word, but CLIP puts images and their captions close
together, so LinCIR trains it on *caption* embeddings with noise standing in for the modality gap. For a
batch of B captions ``c_b`` with the frozen text tower ``f_t``:

* ``e_b = f_t(c_b)`` [B, D], the projected text embedding, not normalised;
* ``c̃_b``: ``c_b`` with each run of keywords (nouns, proper nouns, adjectives and determiners) replaced
  by the pseudo word ``$`` (``mask="keywords"``, LinCIR's default), or a fixed template such as
  ``"a photo of $"`` (``mask="template"``);
* ``ẽ_b = e_b + σ_b n_b`` with ``σ_b ~ U(0, s)`` per caption and ``n_b ~ N(0, I_D)`` (``s`` =
  ``noise_scale``, LinCIR's 1.0);
* ``p_b = Φ(ẽ_b)`` [B, w], put at every ``$`` of ``c̃_b``: ``ê_b = f_t(c̃_b; $ ← p_b)`` [B, D];
* the loss, minimised over Φ's parameters only::

      L(Φ) = 1 / (B·D) · Σ_b ‖ê_b − e_b‖²₂          (torch.nn.functional.mse_loss, mean)

So ``p_b`` must carry what the masked words said. At inference CVSI feeds Φ the image embedding
``q_v`` in place of ``ẽ_b``. LinCIR's recipe: AdamW (lr 1e-4, weight decay 0.01), constant learning
rate, batch 256 (or 8 × 64), 20 000 steps, dropout 0.5 in Φ; checkpoints ``{"epoch": step, "Phi":
state_dict}`` (:func:`cvsi.phi.save_phi`).

Every step is seeded from ``(seed, step)`` (data order per epoch, noise, dropout), so a resumed run
continues exactly as an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import utils
from checkpoint import load_weights_only
from cvsi.phi import Phi, save_phi
from cvsi.phi_config import MASKS, TAGGERS, PhiTrainingConfig
from cvsi.pseudo_tokens import PSEUDO_WORD, encode_ids_with_pseudo_words, placeholder_token_id
from data_utils import DataError
from model import create_backbone, parse_pretrained
from model.backbone import CLIPBackbone
from precision import autocast, effective_precision, grad_scaler
from retrieval import topk_retrieval

__all__ = [
    "PhiTrainingConfig", "KEYWORD_TAGS", "Span", "heuristic_tagger", "spacy_tagger", "keyword_runs", "mask_caption",
    "clean_caption", "read_caption_corpus", "phi_loss", "reconstruction", "build_models", "train_phi", "TRAIN_STATE_FILE",
    "MASKS", "TAGGERS",
]

_logger = logging.getLogger("cir.cvsi.phi_training")
TRAIN_STATE_FILE = "train_state.pt"
_STATE_FORMAT = 1
# ---------------------------------------------------------------------------------------------- keywords
Span = tuple[int, int, str]  # (start, end) character offsets of a word in the caption, and its POS tag
KEYWORD_TAGS = frozenset({"NOUN", "PROPN", "ADJ", "DET"})  # LinCIR's keyword runs

_WORD = re.compile(r"[\w]+(?:'[\w]+)*|[^\w\s]+")
# Closed word classes (Universal POS tags) for the dependency-free tagger; every other word counts as a
# noun (a keyword), except -ing forms, which count as verbs unless listed as nouns.
_CLOSED_CLASSES = {
    "DET": "a an the this that these those some any each every no another its his her their my your our all both",
    "ADP": "in on at with of by for from to into onto under over near next behind above below beside besides between "
           "through across along around against without within inside outside toward towards up down off out about "
           "like than as upon among beneath underneath during after before via per",
    "CCONJ": "and or but nor yet",
    "SCONJ": "while because if so whereas although though when where whether since until unless",
    "NUM": "one two three four five six seven eight nine ten eleven twelve twenty hundred",
    "PRON": "it he she they them him we you i me us someone something anything nothing who whom whose which what "
            "there here itself themselves himself herself",
    "AUX": "is are was were be been being am has have had do does did can could will would should may might must",
    "PART": "not 's",
    "ADV": "very also just more most less least instead rather too only even still again almost really quite",
}
_TAG_OF = {word: tag for tag, words in _CLOSED_CLASSES.items() for word in words.split()}
_ING_NOUNS = frozenset("building buildings clothing ceiling ceilings painting paintings evening morning wedding "
                       "string strings thing things king ring rings wing wings spring swing swings sibling "
                       "earring earrings pudding icing railing railings awning awnings".split())


def heuristic_tagger(text: str) -> list[Span]:
    """Word spans of ``text`` with coarse POS tags from word lists (no model): the closed classes
    (determiners, prepositions, conjunctions, number words, pronouns, auxiliaries, particles, some
    adverbs), digits (NUM), punctuation (PUNCT), -ing forms as VERB, every other word NOUN. An approximation of
    spaCy's tagger that finds the same noun phrases in plain captions ("a man riding a brown horse")."""
    spans = []
    for match in _WORD.finditer(text):
        word = match.group().lower()
        if word in _TAG_OF:
            tag = _TAG_OF[word]
        elif not word[0].isalnum() and word[0] != "_":
            tag = "PUNCT"
        elif word.isdigit():
            tag = "NUM"
        elif word.endswith("ing") and len(word) > 5 and word not in _ING_NOUNS:
            tag = "VERB"
        else:
            tag = "NOUN"
        spans.append((match.start(), match.end(), tag))
    return spans


def spacy_tagger(model: str = "en_core_web_sm") -> Callable[[str], list[Span]]:
    """LinCIR's tagger: a spaCy pipeline's coarse POS tags (needs ``pip install spacy`` and the model)."""
    try:
        import spacy
    except ImportError as exc:
        raise ImportError("--tagger spacy needs spaCy and its English model: pip install spacy && "
                          f"python -m spacy download {model}") from exc
    nlp = spacy.load(model)
    return lambda text: [(token.idx, token.idx + len(token.text), token.pos_) for token in nlp(text)]


def keyword_runs(spans: Sequence[Span]) -> list[tuple[int, int]]:
    """(start, end) character ranges of the maximal runs of consecutive keyword-tagged words."""
    runs: list[tuple[int, int]] = []
    current: list[int] | None = None
    for start, end, tag in spans:
        if tag in KEYWORD_TAGS:
            current = [current[0], end] if current else [start, end]
        elif current:
            runs.append((current[0], current[1]))
            current = None
    if current:
        runs.append((current[0], current[1]))
    return runs


def clean_caption(caption: str) -> str:
    """LinCIR's cleaning: lower case, no ``$`` (the pseudo word), single spaces."""
    return " ".join(caption.lower().replace(PSEUDO_WORD, " ").split())


def mask_caption(caption: str, tagger: Callable[[str], list[Span]], rng: random.Random) -> str:
    """``c̃``: every keyword run of the (cleaned) caption replaced by one ``$``, kept apart from
    neighbouring punctuation by spaces so the tokenizer sees ``$`` as a word of its own. Without a
    keyword one random word is replaced (as LinCIR); an empty caption gives ``"a photo of $"``."""
    runs = keyword_runs(tagger(caption))
    if not runs:
        words = list(re.finditer(r"\S+", caption))
        if not words:
            return f"a photo of {PSEUDO_WORD}"
        chosen = rng.choice(words)
        runs = [(chosen.start(), chosen.end())]
    pieces, last = [], 0
    for start, end in runs:
        pieces += [caption[last:start], f" {PSEUDO_WORD} "]
        last = end
    pieces.append(caption[last:])
    return " ".join("".join(pieces).split())


# ---------------------------------------------------------------------------------------------- corpus
def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (str, list)):
                yield from _strings(item)


def read_caption_corpus(paths: Sequence[str | Path]) -> list[str]:
    """Cleaned, distinct, non-empty captions from caption files, in file order.

    Formats: ``.txt``, one caption per line; ``.json``, a list of captions (or of caption lists), a
    caption file as CVSI's release and the synthetic generator write it (``target_captions`` /
    ``all_captions``: lists of caption lists), or an object mapping names to a caption or caption list.
    """
    captions: dict[str, None] = {}
    for path in map(Path, paths):
        suffix = path.suffix.lower()
        if suffix not in (".txt", ".json"):
            raise DataError(f"caption corpus {path}: expected a .txt (one caption per line) or .json file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"caption corpus {path}: cannot read ({exc})") from exc
        if suffix == ".txt":
            found = text.splitlines()
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"caption corpus {path}: not valid JSON ({exc})") from exc
            if isinstance(data, dict):
                roles = [key for key in ("target_captions", "all_captions") if key in data]
                data = [data[key] for key in roles] if roles else list(data.values())
            found = list(_strings(data)) if isinstance(data, list) else []
        cleaned = [caption for caption in map(clean_caption, found) if caption]
        if not cleaned:
            raise DataError(f"caption corpus {path}: no captions found")
        captions.update(dict.fromkeys(cleaned))
    return list(captions)


# ---------------------------------------------------------------------------------------------- loss
def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % 2**63


def phi_loss(backbone: CLIPBackbone, phi: Phi, caption_ids: Tensor, masked_ids: Tensor, placeholder_id: int,
             noise_scale: float, generator: torch.Generator | None = None) -> Tensor:
    """LinCIR's loss ``L(Φ) = 1/(B·D) Σ_b ‖f_t(c̃_b; $ ← Φ(e_b + σ_b n_b)) − e_b‖²`` (module docstring).

    Args:
        caption_ids: [B, L] the tokenised captions ``c_b``; ``masked_ids``: [B, L'] the tokenised ``c̃_b``,
            each with at least one placeholder.
        noise_scale: ``s`` in ``σ_b ~ U(0, s)``; 0 gives the noise-free reconstruction error.
        generator: CPU generator for σ and n (seeded per step for exact resumption).
    """
    device = next(phi.parameters()).device
    with torch.no_grad():
        target = backbone.encode_text(caption_ids.to(device)).embeds.float()  # e [B, D]
    sigma = torch.rand(target.shape[0], 1, generator=generator) * noise_scale  # [B, 1]
    noise = torch.randn(target.shape, generator=generator)  # [B, D]
    pseudo = phi(target + (sigma * noise).to(device))  # p [B, w]
    predicted = encode_ids_with_pseudo_words(backbone, masked_ids.to(device), pseudo, placeholder_id)  # ê [B, D]
    return F.mse_loss(predicted.float(), target)


def _tokenize_pair(backbone: CLIPBackbone, captions: Sequence[str], masked: Sequence[str], placeholder_id: int,
                   template: str) -> tuple[Tensor, Tensor]:
    """Token ids of the captions and of their masked versions; a masked caption whose every ``$`` fell
    past the context length is replaced by the template (as LinCIR falls back to "a photo of $")."""
    masked_ids = backbone.tokenize(masked)
    lost = [i for i, row in enumerate((masked_ids == placeholder_id).any(dim=1).tolist()) if not row]
    if lost:
        masked = [template if i in set(lost) else m for i, m in enumerate(masked)]
        masked_ids = backbone.tokenize(masked)
    return backbone.tokenize(captions), masked_ids


@torch.no_grad()
def reconstruction(backbone: CLIPBackbone, phi: Phi, captions: Sequence[str], masked: Sequence[str],
                   template: str = "a photo of $", batch_size: int = 256) -> dict[str, float]:
    """How well Φ's pseudo word restores what the mask hid, without noise and in eval mode, over N
    captions: ``mse`` = mean ``‖ê_i − e_i‖² / D`` (the loss at σ = 0), ``cosine`` = mean ``cos(ê_i, e_i)``
    and ``recall@1`` = the fraction of captions whose ``ê_i`` is closer (cosine) to their own ``e_i``
    than to any other ``e_j`` of the N: whether the pseudo word tells the captions apart."""
    was_training = phi.training
    phi.eval()
    placeholder = placeholder_token_id(backbone)
    device = next(phi.parameters()).device
    targets, predictions = [], []
    for start in range(0, len(captions), batch_size):
        caption_ids, masked_ids = _tokenize_pair(backbone, captions[start:start + batch_size],
                                                 masked[start:start + batch_size], placeholder, template)
        target = backbone.encode_text(caption_ids.to(device)).embeds.float()
        predictions.append(encode_ids_with_pseudo_words(backbone, masked_ids.to(device), phi(target), placeholder).float().cpu())
        targets.append(target.cpu())
    phi.train(was_training)
    target, predicted = torch.cat(targets), torch.cat(predictions)  # [N, D]
    _, nearest = topk_retrieval(F.normalize(predicted, dim=-1), F.normalize(target, dim=-1), 1)
    return {"mse": F.mse_loss(predicted, target).item(),
            "cosine": F.cosine_similarity(predicted, target, dim=-1).mean().item(),
            "recall@1": (nearest[:, 0] == torch.arange(len(captions))).float().mean().item()}


# ---------------------------------------------------------------------------------------------- training
class _MaskedCaptions(torch.utils.data.Dataset):
    """(caption, masked caption) pairs; masks are made lazily (in loader workers) and seeded per caption."""

    def __init__(self, captions: Sequence[str], config: PhiTrainingConfig) -> None:
        self.captions, self.config = list(captions), config
        self._tagger: Callable[[str], list[Span]] | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[str, str]:
        caption = self.captions[index]
        if self.config.mask == "template":
            return caption, self.config.template
        if self._tagger is None:
            self._tagger = spacy_tagger() if self.config.tagger == "spacy" else heuristic_tagger
        return caption, mask_caption(caption, self._tagger, random.Random(_step_seed(self.config.seed, index)))


def _collate_pairs(pairs: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    return [caption for caption, _ in pairs], [masked for _, masked in pairs]


def _corpus_digest(captions: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for caption in captions:
        digest.update(caption.encode("utf-8") + b"\n")
    return digest.hexdigest()[:24]


def _batches(size: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """An epoch's batches: a seeded permutation, the last incomplete batch dropped (as LinCIR)."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(_step_seed(seed, -1 - epoch))).tolist()
    return [order[i:i + batch_size] for i in range(0, size - batch_size + 1, batch_size)]


def _split(captions: list[str], config: PhiTrainingConfig) -> tuple[list[str], list[str]]:
    """(training captions, held-out captions): a seeded ``val_fraction`` of the corpus held out."""
    held = math.floor(len(captions) * config.val_fraction)
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(config.seed)).tolist()
    held_out = set(order[:held])
    return ([c for i, c in enumerate(captions) if i not in held_out],
            [c for i, c in enumerate(captions) if i in held_out])


@dataclass
class _Progress:
    """What a checkpoint of the training state holds besides the settings: Φ, the optimizer, the
    learning-rate schedule, the loss scaler, the step, the best held-out error and the log rows."""

    phi: Phi
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    step: int = 0
    best: float = math.inf
    history: list[dict[str, float]] = field(default_factory=list)

    def save(self, path: Path, identity: dict[str, Any]) -> None:
        state = {"format": _STATE_FORMAT, "identity": identity, "step": self.step, "best": self.best,
                 "history": self.history, "phi": self.phi.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}
        utils.atomic_torch_save(path, state)

    def restore(self, path: Path, identity: dict[str, Any]) -> None:
        state = load_weights_only(path, ValueError, "Φ training state", "cpu")
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"{path}: not a Φ training state of format {_STATE_FORMAT}")
        changed = sorted(key for key in identity if state["identity"].get(key) != identity[key])
        if changed:
            raise ValueError(f"--resume: {path} was trained with other settings ({', '.join(changed)})")
        self.phi.load_state_dict(state["phi"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best, self.history = state["step"], state["best"], state["history"]


def build_models(config: PhiTrainingConfig, device: torch.device | str = "cpu") -> tuple[CLIPBackbone, Phi]:
    """The frozen backbone (eval mode) and Φ as initialised before the first step, both seeded by
    ``config.seed`` (random backbone weights with ``pretrained`` None)."""
    torch.manual_seed(config.seed)
    backbone = create_backbone(config.clip_model_name, parse_pretrained(config.pretrained), device=device)
    backbone.eval().requires_grad_(False)
    phi = Phi(backbone.embed_dim, backbone.text_width, dropout=config.dropout).to(device)
    return backbone, phi


def train_phi(config: PhiTrainingConfig) -> dict[str, Any]:
    """Train Φ for ``config.clip_model_name`` on the caption corpus (module docstring for the method).

    Writes under ``output_dir``: ``config.json``; ``checkpoints/phi_<step:09d>.pt`` every
    ``checkpointing_steps`` and at the end, ``phi_latest.pt`` and, with held-out captions,
    ``phi_best.pt`` (lowest held-out reconstruction error), all in LinCIR's layout; the training state
    ``checkpoints/train_state.pt`` (optimizer, schedule, step) for ``resume``; ``train_log.json``.

    Returns:
        {"step": last step, "history": [log rows], "latest": path, "best": path or None}.
    """
    config.check()
    output_dir = Path(config.output_dir)
    checkpoints = output_dir / "checkpoints"
    state_path = checkpoints / TRAIN_STATE_FILE
    if config.resume and not state_path.is_file():
        raise ValueError(f"--resume: {state_path} does not exist")
    if not config.resume and state_path.exists():
        raise ValueError(f"{output_dir} already holds a Φ training run; pass --resume to continue it or choose "
                         "another --output_dir")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = effective_precision(config.precision, device)

    captions, held_out = _split(read_caption_corpus(config.captions), config)
    if len(captions) < config.batch_size:
        raise ValueError(f"the caption corpus has {len(captions)} training captions, fewer than one batch "
                         f"(--batch_size {config.batch_size})")

    backbone, phi = build_models(config, device)
    placeholder = placeholder_token_id(backbone)
    optimizer = torch.optim.AdamW(phi.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    run = _Progress(phi, optimizer, scheduler, grad_scaler(precision, device))
    identity = {**config.identity(), "corpus": _corpus_digest(captions)}
    if config.resume:
        run.restore(state_path, identity)
        _logger.info("resumed %s at step %d", state_path, run.step)
    checkpoints.mkdir(parents=True, exist_ok=True)
    utils.atomic_write_json(output_dir / "config.json", asdict(config))

    dataset = _MaskedCaptions(captions, config)
    held_out_masked = [_MaskedCaptions(held_out, config)[i][1] for i in range(len(held_out))]
    per_epoch = len(captions) // config.batch_size
    latest = checkpoints / "phi_latest.pt"
    _logger.info("training Φ (%s -> %s) on %d captions (%d held out), %d steps per epoch",
                 backbone.embed_dim, backbone.text_width, len(captions), len(held_out), per_epoch)

    phi.train()
    running: list[float] = []
    while run.step < config.max_train_steps:
        epoch, position = divmod(run.step, per_epoch)
        batches = _batches(len(captions), config.batch_size, config.seed, epoch)[position:]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=config.num_workers,
                                             collate_fn=_collate_pairs)
        for batch_captions, batch_masked in loader:
            caption_ids, masked_ids = _tokenize_pair(backbone, batch_captions, batch_masked, placeholder,
                                                     config.template)
            torch.manual_seed(_step_seed(config.seed, run.step))  # dropout
            generator = torch.Generator().manual_seed(_step_seed(config.seed, run.step))  # σ, n
            with autocast(precision, device):
                loss = phi_loss(backbone, phi, caption_ids, masked_ids, placeholder, config.noise_scale, generator)
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(optimizer)
            run.scaler.update()
            scheduler.step()
            run.step += 1
            running.append(loss.item())
            if run.step % config.log_every == 0:
                _logger.info("step %d: loss %.5f (mean since the last checkpoint), lr %.2e", run.step,
                             sum(running) / len(running), scheduler.get_last_lr()[0])
            if run.step % config.checkpointing_steps == 0 or run.step == config.max_train_steps:
                row: dict[str, float] = {"step": run.step, "loss": sum(running) / len(running)}
                running = []
                save_phi(checkpoints / f"phi_{run.step:09d}.pt", phi, run.step)
                save_phi(latest, phi, run.step)
                if held_out:
                    row.update({f"val_{k}": v for k, v in reconstruction(
                        backbone, phi, held_out, held_out_masked, config.template, config.batch_size).items()})
                    if row["val_mse"] < run.best:
                        run.best = row["val_mse"]
                        save_phi(checkpoints / "phi_best.pt", phi, run.step)
                run.history.append(row)
                _logger.info("checkpoint at step %d: %s", run.step, row)
                run.save(state_path, identity)
                utils.atomic_write_json(output_dir / "train_log.json", run.history)
            if run.step >= config.max_train_steps:
                break
    best_path = checkpoints / "phi_best.pt"
    return {"step": run.step, "history": run.history, "latest": latest, "best": best_path if best_path.is_file() else None}
