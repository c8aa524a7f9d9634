"""Efficiency options (chunked evaluation loss, dtype, attention kernel, gradient checkpointing, fused AdamW) and
the cost benchmark, at tiny sizes on the CPU."""
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from methods import get_attention, get_method
from workflow import runtime
from workflow.batches import finetune_batches
from workflow.config import ConfigError, compose
from workflow.scoring import token_losses
from workflow.train import optimizer_for, train
from tests.helpers import random_ids, tiny_llama

W = 32


def cell_model(rope="none", attention="exact", target=W):
    model = tiny_llama(seed=3, vocab=300, hidden=32, intermediate=64, heads=4, kv_heads=2, window=W,
                       tie_word_embeddings=False)
    get_method(rope).apply(model, W, target, "frozen")
    if attention != "exact":
        params = {"n_local": 8, "n_global": 2} if attention == "lm_infinite" else {"mem_freq": 3, "top_k": 2}
        get_attention(attention).apply(model, W, W, "frozen" if attention == "lm_infinite" else "finetuned", **params)
    return model.eval()


@pytest.mark.parametrize("rope,attention", [("none", "exact"), ("yarn", "exact"), ("dynamic_ntk", "exact"),
                                            ("clex", "exact"), ("none", "lm_infinite"), ("none", "landmark")])
@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 1000])
def test_chunked_loss_equals_the_whole_sequence_loss(rope, attention, chunk):
    model = cell_model(rope, attention, target=4 * W if rope != "none" else W)
    batch = torch.cat([random_ids(96, 300, seed=1), random_ids(96, 300, seed=2)])
    whole = token_losses(model, batch)
    chunked = token_losses(model, batch, chunk)
    assert chunked.shape == whole.shape == (2, 95)
    if chunk >= 16:  # the same output-layer GEMM kernel as the whole sequence: bit for bit
        assert torch.equal(chunked, whole)
    else:  # a few rows take another BLAS kernel (another summation order): float32 rounding only
        torch.testing.assert_close(chunked, whole, rtol=0, atol=2e-6)


def test_chunked_loss_never_builds_logits_of_the_whole_sequence(monkeypatch):
    model = cell_model()
    head = model.get_output_embeddings()
    widths = []
    monkeypatch.setattr(head, "forward", lambda x, f=head.forward: widths.append(x.shape[1]) or f(x))
    token_losses(model, random_ids(100, 300), 16)
    assert max(widths) == 16 and sum(widths) == 99


def test_dtype_and_kernel_settings():
    cpu = torch.device("cpu")
    assert runtime.compute_dtype("auto", cpu) == torch.float32
    assert runtime.compute_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="model.dtype must be one of"):
        runtime.compute_dtype("fp8", cpu)
    assert runtime.check_attn_implementation("sdpa") == "sdpa"
    with pytest.raises(ValueError, match="flash_attention_2 needs the flash-attn package|needs a CUDA device"):
        runtime.check_attn_implementation("flash_attention_2")
    with pytest.raises(ConfigError, match="model.attn_implementation must be one of"):
        compose("micro", ["model.attn_implementation=flash3"])
    with pytest.raises(ConfigError, match="model.dtype must be one of"):
        compose("micro", ["model.dtype=half"])


def test_fused_adamw_only_on_cuda():
    model = cell_model()
    assert not runtime.use_fused_adamw(model, {"fused_adamw": True})  # CPU weights
    cfg = {"fused_adamw": True, "weight_decay": 0.0, "lr": 1e-3, "betas": [0.9, 0.95]}
    assert not optimizer_for(model, cfg).defaults["fused"]


def test_gradient_checkpointing_trains_the_same_model(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 300, size=4000).astype(np.uint16)
    cfg = {"steps": 3, "lr": 1e-2, "schedule": "constant_with_warmup", "warmup_steps": 1, "min_lr_ratio": 1.0,
           "weight_decay": 0.0, "betas": [0.9, 0.95], "grad_clip": 1.0, "seed": 0, "checkpoint_every": 10}
    results = []
    for checkpointing in (False, True):
        model = cell_model().train()
        summary = train(model, finetune_batches(tokens, W, 4 * W), {**cfg, "gradient_checkpointing": checkpointing},
                        tmp_path / str(checkpointing), "t")
        results.append((summary["final_loss"], model))
    assert results[1][1].model.gradient_checkpointing and not results[0][1].model.gradient_checkpointing
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(results[0][1].parameters(), results[1][1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_cost_benchmark_writes_its_rows(tmp_path, capsys):
    from workflow.tools.bench_cost import main

    db = tmp_path / "bench.duckdb"
    cells = ["pi-exact-128-ft", "none-lm_infinite-64-frozen", "yarn-exact-256-frozen"]
    assert main(["--study", "micro", "--db", str(db), "--cells", *cells, "--eval-lens", "64", "128",
                 "--vocab-size", "128", "--peak-tflops", "0.5", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "GPU targets not checked: no CUDA device" in printed and "rows written" in printed
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT phase, cell_id, seq_len, tokens_per_s, peak_mem_mb, mfu, flops_per_token, "
                           "throughput_vs_base FROM benchmarks ORDER BY phase, cell_id, seq_len").fetchall()
    got = {(r[0], r[1], r[2]) for r in rows}
    assert got == {("finetune", "none-exact", 128), ("finetune", "pi-exact-128-ft", 128),
                   *{("eval", c, n) for c in ["none-exact", *cells] for n in (64, 128)}}
    for phase, cell, n, tps, mem, mfu, fpt, ratio in rows:
        assert tps > 0 and mem >= 0 and 0 < mfu < 1 and fpt > 0
        assert ratio == 1.0 if cell == "none-exact" else ratio > 0
    # 6·N + attention FLOPs per training token: three times the forward count at the same length
    by = {(r[0], r[1], r[2]): r for r in rows}
    assert by[("finetune", "none-exact", 128)][6] == pytest.approx(3 * by[("eval", "none-exact", 128)][6])


def test_the_gpu_targets_are_checked_from_the_rows():
    from workflow.tools.bench_cost import check_targets

    targets = {"rope_throughput_overhead": 0.05, "finetune_mfu": 0.3, "finetune_mfu_len": 16384,
               "lm_infinite_memory_ratio": 0.25, "lm_infinite_memory_len": 65536}
    row = dict(phase="finetune", cell_id="yarn-exact-16384-ft", rope="yarn", attention="exact", seq_len=16384,
               throughput_vs_base=0.97, mfu=0.35, memory_vs_base=1.0)
    lm = dict(row, phase="eval", cell_id="none-lm_infinite-8192-frozen", rope="none", attention="lm_infinite",
              seq_len=65536, memory_vs_base=0.2)
    lines = check_targets([row, lm], targets)
    assert [line.split()[0] for line in lines] == ["PASS", "PASS", "PASS"]
    lines = check_targets([dict(row, throughput_vs_base=0.9, mfu=0.2), dict(lm, memory_vs_base=0.5)], targets)
    assert [line.split()[0] for line in lines] == ["FAIL", "FAIL", "FAIL"]


TRAINING_STEPS = """
import resource, sys, torch
from workflow.common import configure_cpu
from workflow.modeling import load_model
configure_cpu(1) if sys.argv[1] == "configured" else torch.set_num_threads(1)
model = load_model("models/tiny-base", "sdpa", "float32")
rows = torch.randint(0, model.config.vocab_size, (4, 512), generator=torch.Generator().manual_seed(0))
for step in range(6):
    if step == 2:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(input_ids=rows, labels=rows).loss.backward()
    model.zero_grad(set_to_none=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def huge_pages_always() -> bool:
    """Whether the kernel backs every fresh mapping with 2 MiB pages (then a fresh mapping faults 512 times less)."""
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return setting.exists() and "[always]" in setting.read_text()


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
@pytest.mark.skipif(huge_pages_always(), reason="transparent huge pages on every mapping: few page faults either way")
def test_configure_cpu_keeps_freed_memory_for_the_next_step():
    """Every training step frees and allocates again the same large tensors (logits, their gradients); unless the
    allocator keeps freed memory, each costs a page fault per 4 KiB page again. Steps 3 to 6 of the shipped model
    on 4 rows of 512 tokens, in a fresh process each."""
    def page_faults_of_late_steps(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", TRAINING_STEPS, mode], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[1])
        return int(run.stdout.split()[-1])

    default = page_faults_of_late_steps("default")
    assert default > 40_000
    assert page_faults_of_late_steps("configured") < default / 5
