"""Peak memory and time of the LM loss (fwd + bwd): chunked vs full fp32 logits.

Methods on the same inputs (one row of T tokens, a fraction supervised):
- ``full``: the baseline, fp32 logits for every token and ``F.cross_entropy(ignore_index)``;
- ``checkpoint``: supervised rows only, ``torch.utils.checkpoint`` around each chunk's CE
  (the alternative design; opt in with ``--methods full,checkpoint,chunked``);
- ``chunked``: ``comp.models.losses.chunked_causal_lm_loss`` (custom autograd function).

Memory, honestly: every (method, T) case runs in a fresh subprocess. On CPU the child
resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``) after building
its inputs and reports ``VmHWM - VmRSS`` around the first fwd+bwd, i.e. the extra resident
memory that pass needed (the head's weight gradient included: every method allocates it
unless ``--frozen-head``; the ``-grad/full`` column leaves that common [V, D] fp32 gradient
out of both sides). On CUDA it reports ``max_memory_allocated`` minus the allocation before
the pass. Time is the best of ``--repeats`` passes.

On 2 shared CPU cores the full baseline alone takes ~15 s at 1024 tokens (vocab 151,936):
    python benchmarks/bench_lm_loss.py --quick    # 1024 tokens, ~30 s
    python benchmarks/bench_lm_loss.py            # 512, 1024, 2048 tokens, ~1.5 min
    python benchmarks/bench_lm_loss.py --device cuda --tokens 8192,32768,65536 --chunk-size 4096
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from comp.models.losses import chunked_causal_lm_loss

METHODS = ("full", "checkpoint", "chunked")


def full_loss(hidden_1TD, weight_VD, labels_1T, chunk_size):
    logits = F.linear(hidden_1TD, weight_VD).float()
    return F.cross_entropy(logits[0, :-1], labels_1T[0, 1:], ignore_index=-100)


def checkpoint_loss(hidden_1TD, weight_VD, labels_1T, chunk_size):
    keep_T = labels_1T[0, 1:] != -100
    h_ND, t_N = hidden_1TD[0, :-1][keep_T], labels_1T[0, 1:][keep_T]

    def chunk_ce(h, t):
        return F.cross_entropy(F.linear(h, weight_VD).float(), t, reduction="sum")

    total = sum(checkpoint(chunk_ce, h_ND[s:s + chunk_size], t_N[s:s + chunk_size], use_reentrant=False)
                for s in range(0, h_ND.shape[0], chunk_size))
    return total / max(t_N.numel(), 1)


def chunked_loss(hidden_1TD, weight_VD, labels_1T, chunk_size):
    return chunked_causal_lm_loss(hidden_1TD, weight_VD, labels_1T, chunk_size=chunk_size)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def run_case(args) -> dict:
    """One (method, tokens) case; runs inside its own subprocess."""
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(args.vocab, args.width, generator=g, device=device, dtype=dtype) * 0.02)
    weight.requires_grad_(not args.frozen_head)
    hidden = torch.randn(1, args.case_tokens, args.width, generator=g, device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (1, args.case_tokens), generator=g, device=device)
    labels[torch.rand(1, args.case_tokens, generator=g, device=device) >= args.supervised] = -100
    fn = {"full": full_loss, "checkpoint": checkpoint_loss, "chunked": chunked_loss}[args.case_method]

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, labels, args.chunk_size).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_kb("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    start = time.perf_counter()
    step()
    times = [time.perf_counter() - start]
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kb("VmHWM") * 1024) - base
    for _ in range(args.repeats - 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"peak_bytes": peak, "seconds": min(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--width", type=int, default=896)
    p.add_argument("--tokens", default="512,1024,2048", help="comma-separated token counts")
    p.add_argument("--methods", default="full,chunked", help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--supervised", type=float, default=0.5, help="fraction of supervised tokens")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--frozen-head", action="store_true", help="lm_head without gradient (Stage I)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1024 tokens only")
    p.add_argument("--case-method", help=argparse.SUPPRESS)
    p.add_argument("--case-tokens", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case_method:
        print(json.dumps(run_case(args)))
        return

    methods = ["full"] + [m for m in args.methods.split(",") if m in METHODS and m != "full"]
    tokens = [1024] if args.quick else [int(t) for t in args.tokens.split(",")]
    passthrough = [a for a in sys.argv[1:] if a != "--quick"]
    print(f"vocab {args.vocab}, width {args.width}, {args.dtype} on {args.device}, "
          f"{args.supervised:.0%} supervised, chunk {args.chunk_size}, "
          f"head {'frozen' if args.frozen_head else 'trained'}; peak = extra memory of one fwd+bwd "
          f"({'CUDA max_memory_allocated' if args.device.startswith('cuda') else 'VmHWM-VmRSS, fresh process'})")
    head_grad = 0 if args.frozen_head else args.vocab * args.width * 4
    print(f"{'tokens':>7} {'method':>10} {'peak MiB':>9} {'time ms':>9} {'peak/full':>9} "
          f"{'-grad/full':>10} {'time/full':>9}")
    for T in tokens:
        results = {}
        for method in methods:
            cmd = [sys.executable, __file__, *passthrough, "--case-method", method, "--case-tokens", str(T)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                results[method] = None
                print(f"{T:>7} {method:>10} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results["full"]
        for method in methods:
            r = results[method]
            if r is None:
                continue
            if base:
                ratio = f"{r['peak_bytes'] / base['peak_bytes']:9.1%}"
                ex_grad = f"{(r['peak_bytes'] - head_grad) / (base['peak_bytes'] - head_grad):10.1%}"
                tratio = f"{r['seconds'] / base['seconds']:9.2f}"
            else:
                ratio, ex_grad, tratio = f"{'-':>9}", f"{'-':>10}", f"{'-':>9}"
            print(f"{T:>7} {method:>10} {r['peak_bytes'] / 2**20:9.0f} {r['seconds'] * 1e3:9.0f} "
                  f"{ratio} {ex_grad} {tratio}")


if __name__ == "__main__":
    main()
