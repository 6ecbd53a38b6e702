"""GPU benchmark (one H100/H200, under 5 minutes): the fused entropy + log-prob kernel.

    python benchmarks/entropy_gpu.py [--quick]

1. Correctness of the Triton kernel against float64 (values and gradients; bf16 and fp32; -inf
   padding; temperature; a row subset).
2. Milliseconds and % of the memory-bandwidth floor, forward and forward+backward, at
   N in {4096, 16384}, V = 151936, bf16 logits. Floor = bytes that must move (forward: read the
   logits; forward+backward: read them twice and write the gradient) / a device-to-device copy
   rate measured here. Compared with the host's path (float32 upcast, then OpenRLHF 0.11.2's
   compiled full-vocabulary entropy and its log-softmax gather, restated here because importing
   OpenRLHF needs flash-attn) and with the eager float32 form; extra memory = peak allocated
   above the inputs.
3. One training step of a Qwen2.5-0.5B-shaped model with random weights (no download): the host's
   actor forward with --actor.entropy_coef 0 (entropy over all positions, for logging) versus the
   plugin's (host log-probs unchanged, entropy by the kernel on action rows only, in the loss).
Every figure of one run comes from the same device; compare ratios within a run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from openrlhf_hooks.kernels import entropy_logprob  # noqa: E402

VOCAB = 151936


def copy_rate() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read and written."""
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=50)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2 * 1024**3 / (ms / 1e3)


@torch.compile
def host_compute_entropy(logits):
    # openrlhf/models/utils.py compute_entropy (0.11.2), restated
    pd = torch.nn.functional.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)


def host_path(logits, labels):
    x = logits.float()  # Actor.forward: output["logits"].to(torch.float32)
    logprob = x.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(x, -1)
    return host_compute_entropy(x), logprob


def eager_path(logits, labels):
    log_p = torch.log_softmax(logits.float(), -1)
    return -(log_p.exp() * log_p).sum(-1), log_p.gather(1, labels[:, None]).squeeze(1)


def kernel_path(logits, labels):
    return entropy_logprob(logits, labels)


def reference(logits, labels, temperature=1.0, rows=None):
    x = logits.double() / temperature
    x = x if rows is None else x[rows]
    log_p = torch.log_softmax(x, -1)
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1), log_p.gather(1, labels[:, None]).squeeze(1)


def correctness() -> list[str]:
    lines = []
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for temperature, rows in ((1.0, None), (0.7, torch.tensor([0, 5, 100, 255], device="cuda"))):
            logits = (torch.randn(256, VOCAB, device="cuda") * 4).to(dtype)
            logits[:, -64:] = -math.inf
            logits[0, :1000] = 1e4 if dtype == torch.float32 else 1e3
            n = 256 if rows is None else rows.numel()
            labels = torch.randint(0, VOCAB - 64, (n,), device="cuda")
            x = logits.clone().requires_grad_(True)
            h, lp = entropy_logprob(x, labels, temperature, rows=rows)
            g_h, g_l = torch.randn_like(h), torch.randn_like(lp)
            (h * g_h + lp * g_l).sum().backward()
            rh, rl = reference(logits, labels, temperature, rows)
            # analytic float64 gradient of sum(gH H + gL logprob): [-gH p (log p + H) + gL (onehot - p)] / T
            xs = logits.double() / temperature
            xs = xs if rows is None else xs[rows]
            log_p = torch.log_softmax(xs, -1)
            p = log_p.exp()
            log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
            onehot = torch.zeros_like(p).scatter_(1, labels[:, None], 1.0)
            g_rows = (-g_h.double()[:, None] * p * (log_p + rh[:, None]) + g_l.double()[:, None] * (onehot - p))
            ref_grad = torch.zeros_like(logits, dtype=torch.float64)
            ref_grad[slice(None) if rows is None else rows] = g_rows / temperature
            err_h = ((h.double() - rh).abs() / rh.abs().clamp(min=1)).max().item()
            err_l = ((lp.double() - rl).abs() / rl.abs().clamp(min=1)).max().item()
            err_g = ((x.grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
            ok = err_h < 1e-4 and err_l < 1e-4 and err_g < (1e-4 if dtype == torch.float32 else 1e-2)
            lines.append(
                f"| {str(dtype).split('.')[1]} | T={temperature} | rows={'all' if rows is None else n} | "
                f"{err_h:.1e} | {err_l:.1e} | {err_g:.1e} | {'ok' if ok else 'FAIL'} |"
            )
    return lines


def measure(fn, logits, labels, backward: bool):
    g = torch.randn(labels.shape[0], device="cuda")

    def run():
        h, lp = fn(logits, labels)
        if backward:
            torch.autograd.grad((h * g + lp * g).sum(), logits)

    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    ms = triton.testing.do_bench(run, warmup=3, rep=40)
    return ms, extra


def kernel_table(rate: float, sizes) -> list[str]:
    lines = []
    for n in sizes:
        torch.manual_seed(1)
        logits = (torch.randn(n, VOCAB, device="cuda") * 3).to(torch.bfloat16).requires_grad_(True)
        labels = torch.randint(0, VOCAB, (n,), device="cuda")
        bytes_fwd = n * VOCAB * 2
        for name, fn in (("plugin kernel", kernel_path), ("host (fp32 + compiled)", host_path), ("eager fp32", eager_path)):
            try:
                f_ms, f_mem = measure(fn, logits, labels, backward=False)
                b_ms, b_mem = measure(fn, logits, labels, backward=True)
            except torch.OutOfMemoryError:
                lines.append(f"| {n} | {name} | out of memory | | | | |")
                torch.cuda.empty_cache()
                continue
            floor_f = bytes_fwd / rate * 1e3
            floor_b = 3 * bytes_fwd / rate * 1e3
            lines.append(
                f"| {n} | {name} | {f_ms:.2f} | {100 * floor_f / f_ms:.0f}% | {b_ms:.2f} | "
                f"{100 * floor_b / b_ms:.0f}% | {b_mem:.2f} |"
            )
            torch.cuda.empty_cache()
        del logits
        torch.cuda.empty_cache()
    return lines


def training_step_table(batch: int, length: int) -> list[str]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(2)
    model = Qwen2ForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    model.gradient_checkpointing_enable()
    sequences = torch.randint(0, VOCAB, (batch, length), device="cuda")
    action_mask = torch.zeros(batch, length - 1, dtype=torch.bool, device="cuda")
    for start in range(length // 8, length - 1, length // 4):  # four turns of actions per trajectory
        action_mask[:, start : start + length // 8] = True
    advantages = torch.randn(batch, length - 1, device="cuda")
    temperature = 0.7

    def host_logprobs(logits):
        logits = logits.to(torch.float32)
        logits.div_(temperature)  # as Actor.forward
        flat = logits.view(-1, VOCAB)
        # log_probs_from_logits without flash-attn: gather - logsumexp, the latter in row chunks
        lse = torch.cat([torch.logsumexp(flat[i : i + 1024], -1) for i in range(0, flat.shape[0], 1024)])
        labels = torch.roll(sequences, -1, 1)
        lp = logits.gather(-1, labels[..., None]).squeeze(-1) - lse.view(batch, length)
        return logits, lp[:, :-1]

    def host_step():
        logits, lp = host_logprobs(model(sequences).logits)
        entropy = host_compute_entropy(logits)[:, :-1]  # all positions, entropy_coef 0: logged only
        loss = -(lp * advantages * action_mask).sum() / action_mask.sum()
        loss.backward()
        return float((entropy * action_mask).sum() / action_mask.sum())

    def plugin_step():
        logits, lp = host_logprobs(model(sequences).logits)
        flat = logits.view(-1, VOCAB)
        rows = (torch.arange(length - 1, device="cuda") + torch.arange(batch, device="cuda")[:, None] * length)
        rows = rows[action_mask]
        entropy, _ = entropy_logprob(flat, sequences[:, 1:][action_mask], rows=rows)
        loss = -(lp * advantages * action_mask).sum() / action_mask.sum() - 0.001 * entropy.mean()
        loss.backward()
        return float(entropy.mean())

    lines = []
    for name, step in (("host, --actor.entropy_coef 0", host_step), ("plugin (EPO entropy in the loss)", plugin_step)):
        step()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            value = step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
            model.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() / 2**30
        lines.append(f"| {name} | {statistics.median(times):.1f} | {peak:.2f} | {value:.4f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    started = time.time()
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    rate = copy_rate()
    print(f"device-to-device copy: {rate / 1e12:.2f} TB/s (read + write)\n", flush=True)
    print("correctness vs float64 (max error, relative to max(|ref|, 1); gradient relative to its max)")
    print("| dtype | temperature | rows | entropy | log-prob | gradient | |\n|---|---|---|---|---|---|---|")
    print("\n".join(correctness()), flush=True)
    sizes = (1024, 4096) if args.quick else (4096, 16384)
    print(f"\nentropy + log-prob, V = {VOCAB}, bf16 logits")
    print("| N | path | fwd ms | fwd % floor | fwd+bwd ms | fwd+bwd % floor | fwd+bwd extra GiB |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(kernel_table(rate, sizes)), flush=True)
    batch, length = (2, 512) if args.quick else (4, 2048)
    print(f"\ntraining step, Qwen2.5-0.5B shape, random weights, bf16, batch {batch} x {length} tokens, "
          "gradient checkpointing")  # fmt: skip
    print("| path | ms (median of 5) | peak GiB | mean action entropy |\n|---|---|---|---|")
    print("\n".join(training_step_table(batch, length)), flush=True)
    print(f"\ntotal {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
