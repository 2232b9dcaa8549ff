"""CVSI: training-free zero-shot composed image retrieval with complementary visual-semantic integration.

Ye et al., "Fine-Grained Zero-Shot Composed Image Retrieval with Complementary Visual-Semantic
Integration". A frozen CLIP (``f_v``, ``f_t``), LinCIR's mapping network ``Φ``, BLIP-2 captions and an
LLM are combined into query and gallery features:

* ``q_v = f_v(I_r)``; ``q_f = f_t("a photo of $ that {T}. And the photo should have {objects}")`` with
  the word embedding of ``$`` replaced by ``Φ(q_v)``; ``q_m = mean_i f_t(C_i^M)`` over the LLM's
  modified captions;
* ``t_v = f_v(I_k)``; ``t_c = mean_i f_t(C_i^T)`` over the gallery image's captions;
* ``q = α q_m + β q_f + (1−α−β) q_v``, ``t = γ t_c + (1−γ) t_v``, ranked by cosine similarity.

Modules: :mod:`cvsi.params` (the options of a run), :mod:`cvsi.pipeline` (the whole method, scored by
the project's :func:`evaluation.evaluate` over the dataset registry), :mod:`cvsi.features` (CLIP
features: images, caption means, ``q_f``), :mod:`cvsi.semantics` (captions and LLM answers),
:mod:`cvsi.fusion` (the two weighted sums and their retrieval method), :mod:`cvsi.phi` (Φ),
:mod:`cvsi.phi_training` (training Φ from captions, LinCIR-style), :mod:`cvsi.pseudo_tokens` (text
encoding with the pseudo word), :mod:`cvsi.cache` (resumable disk caches), :mod:`cvsi.captioner`
(BLIP-2), :mod:`cvsi.llm` (chat-completions client), :mod:`cvsi.prompts` (LLM prompts),
:mod:`cvsi.imports` (precomputed caption / answer files), :mod:`cvsi.presets` (paper / release option
presets), :mod:`cvsi.loopback` (a local chat-completions server) and :mod:`cvsi.demo` (synthetic
end-to-end demo). The package never imports the training loop, the plotting code or a script.
"""
