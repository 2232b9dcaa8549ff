"""Distributed loss: 2 gloo processes with half a batch each equal 1 process with the whole batch.

Each rank computes ``(q⁺, q⁻, t)`` for its half with a shared SSN head and passes them to
:class:`model.loss.SSNLoss`, which gathers them itself (:func:`distributed.all_gather_with_grad`), takes
the SSN loss on the global batch, and backpropagates; the gradients are then averaged across ranks as
DistributedDataParallel does (sum / world).  Loss and averaged gradients must equal those of
``ssn_loss`` in a single process over the whole batch.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed import all_gather_with_grad
from model import SSNHead, SSNLoss, create_loss, ssn_loss, ssn_loss_terms

WORLD_SIZE = 2
GLOBAL_BATCH = 6
P, L, D_IMG, W = 5, 4, 24, 16


def _head() -> SSNHead:
    torch.manual_seed(0)
    return SSNHead(D_IMG, W, W, nhead=2, dim_feedforward=32).eval()  # eval: no dropout, deterministic


def _global_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    text_mask = torch.ones(GLOBAL_BATCH, L)
    text_mask[1, -1] = 0  # one padded caption
    return {
        "ref_tokens": torch.randn(GLOBAL_BATCH, 1 + P, D_IMG, generator=gen),
        "ref_embed": torch.randn(GLOBAL_BATCH, W, generator=gen),
        "text_tokens": torch.randn(GLOBAL_BATCH, L, W, generator=gen),
        "text_embed": torch.randn(GLOBAL_BATCH, W, generator=gen),
        "text_mask": text_mask,
        "tgt_tokens": torch.randn(GLOBAL_BATCH, 1 + P, D_IMG, generator=gen),
        "tgt_embed": torch.randn(GLOBAL_BATCH, W, generator=gen),
    }


def _features(head: SSNHead, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q_pos, q_neg = head.compose(x["ref_tokens"], x["ref_embed"], x["text_tokens"], x["text_embed"], x["text_mask"])
    return q_pos, q_neg, head.encode_target(x["tgt_tokens"], x["tgt_embed"])


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        head = _head()
        local = GLOBAL_BATCH // WORLD_SIZE
        x = {k: v[rank * local : (rank + 1) * local] for k, v in _global_inputs().items()}
        features = _features(head, x)
        # Without gathering, each rank's loss sees its own half only.
        local = SSNLoss(gather=False)(*features)["loss"]
        torch.testing.assert_close(local, ssn_loss(*features), rtol=0, atol=0)
        loss = SSNLoss()(*features)["loss"]
        loss.backward()
        grads = {}
        for name, param in head.named_parameters():
            dist.all_reduce(param.grad)  # what DDP does: sum over ranks, then divide by the world size
            grads[name] = param.grad / WORLD_SIZE
        torch.save({"loss": loss.detach(), "local": local.detach(), "grads": grads}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_global_batch(tmp_path):
    # fork (where available) skips re-importing torch and open_clip in every worker, as DataLoader workers do.
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True, start_method=start_method)

    head = _head()
    reference_loss = ssn_loss(*_features(head, _global_inputs()))
    reference_loss.backward()
    losses = [torch.load(tmp_path / f"rank{rank}.pt")["local"] for rank in range(WORLD_SIZE)]
    assert not torch.allclose(losses[0], losses[1])  # the halves differ, so the gathered loss is a real check
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], reference_loss.detach(), atol=1e-6, rtol=1e-6)
        for name, param in head.named_parameters():
            torch.testing.assert_close(result["grads"][name], param.grad, atol=1e-6, rtol=1e-5, msg=f"gradient of {name}")


def test_gather_is_the_identity_without_a_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x


def test_ssn_loss_module_in_one_process_is_the_loss_in_fp32():
    features = _features(_head(), _global_inputs())
    terms = SSNLoss(kl_weight=0.3)(*(f.half() for f in features))
    expected = ssn_loss_terms(*(f.half().float() for f in features), kl_weight=0.3)
    assert terms["loss"].dtype == torch.float32 and set(terms) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(terms[key], value, rtol=0, atol=0)
    loss = create_loss("ssn", kl_weight=0.3, gather=False)
    assert isinstance(loss, SSNLoss) and (loss.kl_weight, loss.gather) == (0.3, False)
    with pytest.raises(ValueError, match=r"unknown loss 'triplet'; choose from \('ssn',\)"):
        create_loss("triplet")


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_and_only_rank0_writes(tmp_path):
    """train_cirr.py under torchrun (gloo, 2 processes): one set of outputs, validated once per epoch."""
    import json
    import subprocess
    import sys

    from checkpoint import load_checkpoint
    from synthetic import make_synthetic_cirr

    root = make_synthetic_cirr(tmp_path / "data", seed=5, num_train=64, num_val=16, num_test=8)
    output = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
        str(Path(__file__).resolve().parents[1] / "train_cirr.py"), "--data_root", str(root),
        "--clip_model_name", "ViT-Tiny-P8-32", "--pretrained", "none", "--transform", "clip", "--num_workers", "0",
        "--num_epochs", "2", "--batch_size", "8", "--lr", "1e-3", "--optimizer", "adamw", "--save_best",
        "--device", "cpu", "--output_dir", str(output),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert sum("val/R@1" in r for r in records) == 2  # rank 0 validates, once per epoch
    checkpoint = load_checkpoint(output / "checkpoints" / "last.pt")
    assert checkpoint["sampler"]["num_replicas"] == WORLD_SIZE
    assert checkpoint["global_step"] == 2 * (64 // (WORLD_SIZE * 8))
    assert (output / "summary.json").is_file() and not list(output.glob("*rank1*"))
