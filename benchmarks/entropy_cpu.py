"""CPU benchmark: entropy + log-prob forward and backward, this project's path vs the naive float32 one.

    .venv/bin/python benchmarks/entropy_cpu.py [--n 2048] [--vocab 32768] [--repeats 3]

Each variant runs in its own child process. Peak extra memory = the highest "Total Allocated" of
torch's CPU allocator during one forward+backward (read from the profiler's memory events) minus
its value when the step starts, with the inputs and the gradient buffer already allocated. Times are the median of --repeats runs after one
warm-up; both variants are measured in the same invocation, so compare the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def naive(logits, labels):
    """What many RL codebases do: upcast everything, full log_softmax, p = exp, H = -sum p log p."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return entropy, log_p.gather(1, labels[:, None]).squeeze(1)


def project(logits, labels):
    from openrlhf_hooks.kernels import entropy_logprob

    return entropy_logprob(logits, labels)


def peak_extra_mib(step) -> float:
    """Peak bytes allocated by torch during step(), above the level at its start, in MiB."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.load(open(trace.name))["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    starts = [e["args"]["Total Allocated"] - e["args"]["Bytes"] for e in events if e.get("name") == "[memory]"]
    if not totals:
        return 0.0
    return (max(totals) - starts[0]) / 2**20


def child(variant: str, n: int, vocab: int, repeats: int) -> dict:
    torch.manual_seed(0)
    fn = {"naive": naive, "project": project}[variant]
    logits = (torch.randn(n, vocab) * 2).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,))
    g_h, g_l = torch.randn(n), torch.randn(n)
    logits.grad = torch.zeros_like(logits)  # the gradient buffer itself is not "extra"

    def step():
        entropy, logprob = fn(logits, labels)
        (entropy * g_h + logprob * g_l).sum().backward()

    import openrlhf_hooks.kernels  # noqa: F401  (import cost outside the measurement)

    step()  # warm-up
    extra = peak_extra_mib(step)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "seconds": statistics.median(times), "extra_mib": extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["naive", "project"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.vocab, args.repeats)))
        return
    print(f"entropy + log-prob, forward+backward, N={args.n}, V={args.vocab}, bf16 logits, "
          f"{torch.get_num_threads()} threads", flush=True)  # fmt: skip
    results = {}
    for variant in ("naive", "project"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", variant, "--n", str(args.n), "--vocab", str(args.vocab),
             "--repeats", str(args.repeats)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"  {variant:8s} {r['seconds'] * 1e3:9.1f} ms   peak extra memory {r['extra_mib']:8.1f} MiB", flush=True)
    naive_r, project_r = results["naive"], results["project"]
    print(f"  speed-up: {naive_r['seconds'] / project_r['seconds']:.2f}x   "
          f"extra memory: 1/{naive_r['extra_mib'] / max(project_r['extra_mib'], 1e-9):.1f} of the naive path")  # fmt: skip


if __name__ == "__main__":
    main()
