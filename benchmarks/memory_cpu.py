"""CPU benchmark: peak memory of the EPO entropy path, alone and inside one host training step.

    .venv/bin/python benchmarks/memory_cpu.py [--n 2048] [--vocab 32768] [--layers 2] [--hidden 128]

1. One forward+backward of entropy_logprob on the action rows (half of N) of [N, V] logits, bf16
   and float32: peak memory above the inputs, next to the size of the gradient autograd requires
   (dense N x V in the logits' dtype; see hooks/openrlhf_hooks/kernels/__init__.py for why not smaller).
2. One training step of a tiny Qwen2 (random weights, bf16, no download) the way OpenRLHF 0.11.2's
   actor does it on a machine without flash-attn: logits upcast to float32 and divided by the
   temperature, log-probs by gather - chunked logsumexp, a policy-gradient loss, backward. Three
   variants: the host with --actor.entropy_coef unset (no entropy), the host with entropy_coef 0
   (full-vocabulary entropy computed for logging; eager here, torch.compile'd on GPU), and the host
   plus the EPO plugin's entropy (openrlhf_hooks.trainer.action_entropy: the fused kernel on action
   rows only, in the loss).

Every case runs in its own fresh child process. Two measures of each step:
- allocator: the highest "Total Allocated" of torch's CPU allocator during the step (profiler memory
  events) minus its value when the step starts; the parameters' .grad are unset before the step, so
  they count in every variant alike. Measured on the second step (after a warm-up).
- RSS: the process's peak resident size (VmHWM, reset just before) during the first step minus its
  resident size just before it; includes one-time allocations (oneDNN buffers, allocator slack).
Memory on CPU is deterministic up to the allocator; GPU figures need benchmarks/entropy_gpu.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from entropy_cpu import peak_extra_mib  # noqa: E402  (the allocator measure, shared)

MIB = 2**20
TEMPERATURE = 0.7


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_rss_mib() -> float:
    """VmHWM: the peak resident size since the last reset_peak_rss() (ru_maxrss cannot be reset)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB


def reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM to the current RSS, so building the inputs (with
    # its own, higher, float32 temporaries) does not hide the step's peak
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def measure(step, reset) -> dict:
    """RSS delta of a first step, then the allocator peak of a second one."""
    reset_peak_rss()
    before = rss_mib()
    value = step()
    rss = peak_rss_mib() - before
    reset()
    allocator = peak_extra_mib(step)
    return {"rss_mib": rss, "alloc_mib": allocator, "value": value}


def action_mask_for(batch: int, length: int) -> torch.Tensor:
    """Four turns of actions per trajectory, length / 8 tokens each: half the positions."""
    mask = torch.zeros(batch, length - 1, dtype=torch.bool)
    for start in range(length // 8, length - 1, length // 4):
        mask[:, start : start + length // 8] = True
    return mask


def kernel_case(dtype_name: str, n: int, vocab: int) -> dict:
    from openrlhf_hooks.kernels import entropy_logprob

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    logits = (torch.randn(n, vocab) * 2).to(dtype).requires_grad_(True)
    rows = torch.arange(0, n, 2)  # every other row: half of them, as action rows often are
    labels = torch.randint(0, vocab, (rows.shape[0],))
    g_h = torch.randn(rows.shape[0])

    def step():
        entropy, _ = entropy_logprob(logits, labels, TEMPERATURE, rows=rows)
        (entropy * g_h).sum().backward()
        return float(entropy.mean())

    def reset():
        logits.grad = None

    result = measure(step, reset)
    result["grad_mib"] = n * vocab * logits.element_size() / MIB
    result["rows_mib"] = rows.shape[0] * vocab * logits.element_size() / MIB
    return result


def step_case(variant: str, batch: int, length: int, vocab: int, hidden: int, layers: int) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from openrlhf_hooks.trainer import action_entropy

    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    sequences = torch.randint(0, vocab, (batch, length))
    attention = torch.ones_like(sequences)
    action_mask = action_mask_for(batch, length)
    advantages = torch.randn(batch, length - 1)

    def host_forward():
        # openrlhf/models/actor.py (0.11.2) Actor.forward and log_probs_from_logits without flash-attn
        logits = model(sequences, attention_mask=attention).logits.to(torch.float32)
        logits.div_(TEMPERATURE)
        flat = logits.view(-1, vocab)
        lse = torch.zeros(flat.shape[0], dtype=flat.dtype)
        for start in range(0, flat.shape[0], 1024):
            lse[start : start + 1024] = torch.logsumexp(flat[start : start + 1024], -1)
        labels = torch.roll(sequences, -1, 1)
        log_probs = logits.gather(-1, labels[..., None]).squeeze(-1) - lse.view(batch, length)
        return logits, log_probs[:, :-1]

    def step():
        logits, log_probs = host_forward()
        loss = -(log_probs * advantages * action_mask).sum() / action_mask.sum()
        entropy = None
        if variant == "host-entropy-coef-0":
            # openrlhf compute_entropy over all positions, with grad enabled as in Actor.forward; the
            # host keeps it (for the log) through backward, so its saved tensors live that long too
            probs = torch.softmax(logits, -1)
            entropy = (torch.logsumexp(logits, -1) - (probs * logits).sum(-1))[:, :-1]
            del probs
        elif variant == "epo":
            entropy = action_entropy(logits, sequences, attention, action_mask.float(), packed=False)
            loss = loss - 0.03 * (entropy * action_mask).sum() / action_mask.sum()
        loss.backward()
        return float("nan") if entropy is None else float((entropy * action_mask).sum() / action_mask.sum())

    def reset():
        model.zero_grad(set_to_none=True)

    return measure(step, reset)


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="rows of the kernel case; batch x length of the step")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    length = args.n // args.batch
    if args.child:
        kind, name = args.child
        if kind == "kernel":
            result = kernel_case(name, args.n, args.vocab)
        else:
            result = step_case(name, args.batch, length, args.vocab, args.hidden, args.layers)
        print(json.dumps(result))
        return
    common = ["--n", str(args.n), "--vocab", str(args.vocab), "--batch", str(args.batch),
              "--hidden", str(args.hidden), "--layers", str(args.layers)]  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; one fresh process per row", flush=True)

    print(f"\n1. entropy_logprob forward+backward, N={args.n} logits rows, {args.n // 2} action rows, V={args.vocab}")
    print("| logits | gradient N x V | action rows x V | peak extra (allocator) | peak extra (RSS) |")
    print("|---|---|---|---|---|")
    for dtype in ("bfloat16", "float32"):
        r = run_child("kernel", dtype, *common)
        print(f"| {dtype} | {r['grad_mib']:.0f} MiB | {r['rows_mib']:.0f} MiB | {r['alloc_mib']:.0f} MiB "
              f"({r['alloc_mib'] / r['grad_mib']:.2f}x the gradient) | {r['rss_mib']:.0f} MiB |", flush=True)  # fmt: skip

    logits_mib = args.n * args.vocab * 4 / MIB
    print(f"\n2. one training step, Qwen2 {args.layers} layers x {args.hidden} hidden, V={args.vocab}, bf16 weights, "
          f"batch {args.batch} x {length} tokens, half of them action tokens; float32 logits = {logits_mib:.0f} MiB")  # fmt: skip
    print("| variant | peak extra (allocator) | vs host | peak extra (RSS) | vs host | mean action entropy |")
    print("|---|---|---|---|---|---|")
    results = {}
    for variant, label in (
        ("host", "host, entropy_coef unset"),
        ("host-entropy-coef-0", "host, entropy_coef 0 (logged entropy)"),
        ("epo", "host + EPO plugin entropy in the loss"),
    ):
        r = results[variant] = run_child("step", variant, *common)
        base = results["host"]
        entropy = "-" if r["value"] != r["value"] else f"{r['value']:.4f}"
        print(f"| {label} | {r['alloc_mib']:.0f} MiB | {r['alloc_mib'] / base['alloc_mib']:.2f}x | {r['rss_mib']:.0f} MiB | "
              f"{r['rss_mib'] / base['rss_mib']:.2f}x | {entropy} |", flush=True)  # fmt: skip
    for measure_name, key in (("allocator", "alloc_mib"), ("RSS", "rss_mib")):
        extra = results["epo"][key] - results["host"][key]
        print(f"EPO changes the step's peak ({measure_name}) by {extra:+.0f} MiB = {extra / logits_mib:+.2f} x the float32 logits")


if __name__ == "__main__":
    main()
