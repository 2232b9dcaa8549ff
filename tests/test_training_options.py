"""Speed and memory options of training (issue 7): --grad_checkpointing and --torch_compile on the tiny config."""
from __future__ import annotations

import json
import platform

import pytest
import torch

import train_cirr
import utils
from model import build_ssn_model, ssn_loss
from synthetic import make_synthetic_cirr
from training.model_setup import compile_for_training

TINY = ["--clip_model_name", "ViT-Tiny-P8-32", "--pretrained", "none", "--transform", "clip", "--num_workers", "0",
        "--num_epochs", "1", "--batch_size", "16", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory):
    return make_synthetic_cirr(tmp_path_factory.mktemp("data"), seed=5, num_train=32, num_val=16, num_test=8)


def _loss_and_gradients(grad_checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = build_ssn_model("ViT-Tiny-P8-32").eval()  # eval: the head's dropout off, so both runs are comparable
    model.backbone.set_grad_checkpointing(grad_checkpointing)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=gen)
    token_ids = model.backbone.tokenize(["a red car", "two dogs on a sofa", "no people", "darker"] * 2)
    loss = ssn_loss(*model(images[:4], images[4:], token_ids[:4]))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    loss, grads = _loss_and_gradients(grad_checkpointing=False)
    loss_ckpt, grads_ckpt = _loss_and_gradients(grad_checkpointing=True)
    assert torch.equal(loss, loss_ckpt)
    assert len(grads) == len(grads_ckpt)
    for grad, grad_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(grad_ckpt, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # a training run; the loss and gradients alone: the test above
def test_short_run_with_grad_checkpointing(cirr_root, tmp_path):
    run = train_cirr.main(["--data_root", str(cirr_root), *TINY, "--grad_checkpointing", "--output_dir", str(tmp_path / "run")])
    assert (run / "checkpoints" / "last.pt").is_file()
    assert json.loads((run / "args.json").read_text())["grad_checkpointing"] is True


@pytest.mark.slow  # a training run
def test_torch_compile_steps_aside_with_a_warning_where_unavailable(cirr_root, tmp_path, monkeypatch):
    def unavailable(*args, **kwargs):
        raise RuntimeError("no C++ compiler found for the inductor backend")

    # Compiling the model on CPU takes minutes on CI machines: only the fallback path is run here.
    monkeypatch.setattr(torch, "compile", unavailable)
    run = train_cirr.main(["--data_root", str(cirr_root), *TINY, "--torch_compile", "--output_dir", str(tmp_path / "run")])
    assert (run / "checkpoints" / "last.pt").is_file()
    log = (run / "log.txt").read_text()
    assert "--torch_compile: compilation is unavailable here (no C++ compiler found" in log


def test_compile_for_training_keeps_parameter_names(monkeypatch):
    model = build_ssn_model("ViT-Tiny-P8-32")
    names = list(model.state_dict())
    monkeypatch.setattr(torch, "compile", lambda fn, *args, **kwargs: fn)  # the probe passes without compiling
    compiled = []
    monkeypatch.setattr(model, "compile", lambda *args, **kwargs: compiled.append(True))
    assert compile_for_training(model, torch.device("cpu"))
    assert compiled == [True] and list(model.state_dict()) == names


def test_cpu_allocator_tuning_steps_aside_for_user_settings(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert utils.tune_cpu_allocator() is False  # the user's own allocator settings win
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert utils.tune_cpu_allocator() is expected
