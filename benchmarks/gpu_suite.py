"""Helper of benchmarks/gpu_suite.sh: environment probe, the bf16/fp32 parity check, a
ZeRO-3 ``comp.train`` run with per-step timing, and the one results table.

    python benchmarks/gpu_suite.py env                       # JSON: versions, GPU, optional packages
    python benchmarks/gpu_suite.py parity --assets DIR --device cuda
    torchrun --nproc_per_node 1 benchmarks/gpu_suite.py zero3-train --result FILE -- COMP_TRAIN_FLAGS...
    python benchmarks/gpu_suite.py table DIR                 # the table of the logs in DIR

The suite writes each part's output to ``DIR/<part>.log`` and its exit status to
``DIR/<part>.status`` (``rc seconds limit`` or ``skip REASON``); ``table`` parses the logs
with the patterns below, so a change of a benchmark's printed format shows up as
"unparsed" in its row, never as a wrong number.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

SPEC_PEAK_TFLOPS = 989.0  # H100 SXM dense bf16, spec sheet (the issue's MFU reference)
MEASURED_PEAK_TFLOPS = 777.0  # bf16 matmul measured on the lent H100 (docs/gpu-and-scale.md)


# ------------------------------------------------------------------------------ env


def package_version(name: str) -> str:
    """Installed version, or "not installed" (never imports the package: flash-attn and
    deepspeed print or fail at import on machines without their native parts)."""
    if importlib.util.find_spec(name.replace("-", "_")) is None:
        return "not installed"
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "installed (no metadata)"


def env_report() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "varlen_attn": importlib.util.find_spec("torch.nn.attention.varlen") is not None,
        **{name: package_version(name) for name in ("transformers", "triton", "flash-attn", "deepspeed")},
    }


# ------------------------------------------------------------------------------ parity


def parity(args) -> dict:
    """One training forward of a tiny CoMP-MM (alignment loss on) on one toyworld Stage II
    batch, in fp32 and in bf16 with the same weights: relative loss difference and the
    largest difference of the merged image features relative to their largest magnitude."""
    import copy

    import torch

    from comp import CompForConditionalGeneration, CompProcessor
    from comp.data.collator import DataCollator
    from comp.data.dataset import MixtureDataset

    assets, device = Path(args.assets), torch.device(args.device)
    llm, vision = assets / "qwen2", assets / "siglip"
    processor = CompProcessor.from_components(llm, vision, max_num_vistoken=64)
    torch.manual_seed(0)
    model = CompForConditionalGeneration.from_components(llm, vision, tokenizer=processor.tokenizer,
                                                         use_rope=True, use_alignment_loss=True)
    model.set_word_prior(str(assets / "word_dist.pt"))
    dataset = MixtureDataset.from_yaml(str(assets / "toyworld" / "stage2.yaml"), processor.tokenizer,
                                       processor.image_processor, model_max_length=1024, seed=0)
    items = [dataset[i] for i in range(min(args.samples, len(dataset)))]
    batch = DataCollator(pad_token_id=processor.tokenizer.pad_token_id)(items).to(device).inputs
    if batch["pixel_values"] is None:
        raise SystemExit(f"parity: the first {len(items)} toyworld Stage II samples carry no image")

    results = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = copy.deepcopy(model).to(device=device, dtype=dtype).train()
        with torch.no_grad():
            out = m(**batch)
            feats = m.image_features(batch["pixel_values"], batch["image_grid_thw"]).float()
        results[name] = {"loss": float(out.loss), "lm_loss": float(out.lm_loss),
                         "align_loss": None if out.align_loss is None else float(out.align_loss), "feats": feats}
    f32, f16 = results["fp32"]["feats"], results["bf16"]["feats"]
    report = {
        "device": str(device), "samples": len(items), "image_tokens": int(f32.shape[0]),
        **{f"{k}_{name}": results[name][k] for name in ("fp32", "bf16") for k in ("loss", "lm_loss", "align_loss")},
        "loss_rel_diff": abs(results["bf16"]["loss"] - results["fp32"]["loss"]) / abs(results["fp32"]["loss"]),
        "feat_max_rel_diff": float((f16 - f32).abs().max() / f32.abs().max()),
        "finite": all(math.isfinite(results[n]["loss"]) for n in results),
    }
    print("PARITY " + json.dumps(report))
    return report


# ------------------------------------------------------------------------------ zero3-train


def zero3_train(args) -> None:
    """``comp.train`` (its own parse_args and train) with a callback timing each optimizer
    step; run under torchrun. Writes step seconds and the logged losses to ``--result``."""
    import torch
    from transformers import TrainerCallback

    from comp.train import run

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self._start = 0.0

        def _sync(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kwargs):
            self._sync()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            self.seconds.append(time.perf_counter() - self._start)

    timer = StepTimer()
    trainer = run.train(*run.parse_args(args.flags), callbacks=[timer])
    history = trainer.state.log_history
    losses = {key: [h[key] for h in history if key in h] for key in ("loss", "lm_loss", "align_loss")}
    engine = type(trainer.model_wrapped).__name__
    zero = getattr(getattr(trainer, "deepspeed", None), "zero_optimization_stage", lambda: None)()
    if trainer.args.should_save:
        Path(args.result).write_text(json.dumps({
            "step_seconds": timer.seconds, "losses": losses, "engine": engine, "zero_stage": zero,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}))
    run.exit_distributed(0)


# ------------------------------------------------------------------------------ table


def read_status(out: Path, part: str) -> dict:
    """What the shell recorded: {"rc", "seconds", "limit"} or {"skip": reason}; {} if the part never ran."""
    path = out / f"{part}.status"
    if not path.exists():
        return {}
    words = path.read_text().split(maxsplit=1)
    if words and words[0] == "skip":
        return {"skip": words[1].strip() if len(words) > 1 else "skipped"}
    rc, seconds, limit = (int(w) for w in path.read_text().split()[:3])
    return {"rc": rc, "seconds": seconds, "limit": limit}


def last_error(log: str) -> str:
    """The line that says why a run failed (the exception line, else the last line)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception)\b|^\w+Error:|OutOfMemory|out of memory", line):
            return line[:160]
    return lines[-1][:160] if lines else "no output"


def outcome(out: Path, part: str) -> tuple[str, str]:
    """(status cell, log text) of one part's run."""
    st = read_status(out, part)
    log_path = out / f"{part}.log"
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    if not st:
        return "not run", log
    if "skip" in st:
        return st["skip"], log
    if st["rc"] in (124, 137):
        return f"TIMEOUT after {st['limit']} s", log
    if st["rc"] != 0:
        return f"FAILED rc={st['rc']}: {last_error(log)}", log
    return f"ok ({st['seconds']} s)", log


def encoder_row(log: str) -> str:
    ratio = re.search(r"ratio packed / padded: ([\d.]+)x", log)
    packed = re.search(r"packed \((\w+)\):\s+(\d+) tokens/s\s+\(([\d.]+) ms\)", log)
    padded = re.search(r"padded \+ key mask \(sdpa\):\s+(\d+) tokens/s\s+\(([\d.]+) ms\)", log)
    batch = re.search(r"(\d+) tokens packed, (\d+) padded \(([\d.]+)x\); max \|packed - padded\| = (\S+)", log)
    if not (ratio and packed and padded and batch):
        return "unparsed (see log)"
    return (f"packed[{packed.group(1)}] {int(packed.group(2)):,} tok/s ({packed.group(3)} ms) vs padded "
            f"{int(padded.group(1)):,} tok/s ({padded.group(2)} ms): {ratio.group(1)}x; "
            f"{batch.group(1)} tokens ({batch.group(3)}x padding), max|diff| {batch.group(4)}")


def lm_loss_rows(log: str, tokens: int) -> dict[str, str]:
    """Per method: peak and time, or why it failed (out of memory, as expected for ``full``)."""
    rows = {}
    for line in log.splitlines():
        m = re.match(r"\s*(\d+)\s+(\w+)\s+failed: (.*)$", line)
        if m and int(m.group(1)) == tokens:
            why = m.group(3)
            rows[m.group(2)] = ("out of memory" if re.search(r"out of memory|OutOfMemory", why, re.I)
                                else f"failed: {why[:120]}")
            continue
        m = re.match(r"\s*(\d+)\s+(\w+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$", line)
        if m and int(m.group(1)) == tokens:
            rows[m.group(2)] = (f"peak {int(m.group(3)) / 1024:.2f} GiB extra, {m.group(4)} ms fwd+bwd"
                                + (f", peak/full {m.group(5)}" if m.group(5) != "-" else ""))
    return rows


def train_step_row(log: str) -> str:
    step = re.search(r"step ([\d.]+) s, ([\d.]+) TFLOP/s model FLOPs, MFU ([\d.]+)% of ([\d.]+) TFLOP/s, "
                     r"peak memory (.+)$", log, re.M)
    tokens = re.search(r"tokens/s \(plain step\): ([\d,]+) LLM tokens/s, ([\d,]+) encoder patches/s", log)
    batch = re.search(r"batch: (\d+) samples x (\d+) tokens", log)
    if not (step and tokens):
        return "unparsed (see log)"
    tflops = float(step.group(2))
    return (f"{tokens.group(1)} LLM tok/s, {tokens.group(2)} patches/s, step {step.group(1)} s, "
            f"peak {step.group(5)}, {tflops:.1f} TFLOP/s: MFU {step.group(3)}% of {step.group(4)} "
            f"({tflops / MEASURED_PEAK_TFLOPS:.1%} of {MEASURED_PEAK_TFLOPS:g} measured)"
            + (f"; batch {batch.group(1)} x {batch.group(2)} tokens" if batch else ""))


def zero3_row(result: Path) -> str:
    if not result.exists():
        return "no result file"
    r = json.loads(result.read_text())
    steps, losses = r["step_seconds"], r["losses"]
    later = steps[1:] or steps
    finite = all(math.isfinite(v) for vs in losses.values() for v in vs) and bool(losses["loss"])
    peak = f", peak {r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else ""
    return (f"{r['engine']} ZeRO stage {r['zero_stage']}: {len(steps)} steps, median step after the first "
            f"{statistics.median(later) * 1e3:.0f} ms (first {steps[0] * 1e3:.0f} ms){peak}; losses "
            f"{'finite' if finite else 'NOT FINITE'}: " + ", ".join(f"{v:.4g}" for v in losses["loss"]))


def parity_row(log: str) -> str:
    m = re.search(r"^PARITY (\{.*\})$", log, re.M)
    if not m:
        return "unparsed (see log)"
    r = json.loads(m.group(1))
    return (f"|loss bf16 - fp32| / loss fp32 = {r['loss_rel_diff']:.2e} (fp32 {r['loss_fp32']:.4f}, "
            f"bf16 {r['loss_bf16']:.4f}); merged image features max|diff| / max|fp32| = "
            f"{r['feat_max_rel_diff']:.2e} ({r['image_tokens']} tokens, {r['samples']} samples, {r['device']})"
            + ("" if r["finite"] else "; NOT FINITE"))


def cell(status: str, parse) -> tuple[str, str]:
    """(status, result): the parsed result only when the run finished."""
    if not status.startswith("ok"):
        return status, "-"
    try:
        return status, parse()
    except Exception as e:  # a parser bug must not hide the other rows
        return status, f"unparsed ({type(e).__name__}: {e})"


def build_rows(out: Path) -> list[tuple[str, str, str]]:
    meta = json.loads((out / "suite.json").read_text()) if (out / "suite.json").exists() else {}
    rows: list[tuple[str, str, str]] = []
    env_status, env_log = outcome(out, "env")
    env = None
    if env_status.startswith("ok"):
        env = json.loads(env_log.strip().splitlines()[-1])
        rows.append(("0 environment", env_status, ", ".join(f"{k} {v}" for k, v in env.items())))
    else:
        rows.append(("0 environment", env_status, "-"))

    for variant in ("fwd", "fwd+bwd"):
        for backend in ("flash", "varlen", "sdpa"):
            part = f"encoder_{backend}_{'bwd' if variant == 'fwd+bwd' else 'fwd'}"
            status, log = outcome(out, part)
            rows.append((f"1 encoder {meta.get('encoder_shape', '')} {variant} {backend}".replace("  ", " "),
                         *cell(status, lambda: encoder_row(log))))

    tokens = int(meta.get("lm_tokens", 65536))
    status, log = outcome(out, "lm_loss")
    parsed = lm_loss_rows(log, tokens) if status.startswith("ok") else {}
    for method in ("full", "chunked"):
        if status.startswith("ok"):
            rows.append((f"2 LM loss {tokens} tokens {method}", status, parsed.get(method, "unparsed (see log)")))
        else:
            rows.append((f"2 LM loss {tokens} tokens {method}", status, "-"))

    status, log = outcome(out, "train_step")
    rows.append((f"3 Stage II step {meta.get('step_shape', 'real widths')}", *cell(status, lambda: train_step_row(log))))

    status, _ = outcome(out, "zero3")
    rows.append((f"4 ZeRO-3 {meta.get('zero3_shape', '1 process')}", *cell(status, lambda: zero3_row(out / "zero3.json"))))

    status, log = outcome(out, "parity")
    rows.append(("5 bf16 vs fp32 parity, tiny", *cell(status, lambda: parity_row(log))))
    return rows


def print_table(out: Path) -> None:
    rows = build_rows(out)
    widths = [max(len(r[i]) for r in rows + [("part", "status", "result")]) for i in range(2)]
    widths[1] = min(widths[1], 60)

    def line(a, b, c):
        return f"| {a:<{widths[0]}} | {b[:widths[1]]:<{widths[1]}} | {c} |"

    print(line("part", "status", "result"))
    print(f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|---|")
    for row in rows:
        print(line(*row))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    par = sub.add_parser("parity")
    par.add_argument("--assets", required=True, help="folder with qwen2/, siglip/, toyworld/, word_dist.pt")
    par.add_argument("--device", default="cuda")
    par.add_argument("--samples", type=int, default=4)
    z3 = sub.add_parser("zero3-train")
    z3.add_argument("--result", required=True)
    z3.add_argument("flags", nargs=argparse.REMAINDER, help="comp.train flags (after --)")
    tab = sub.add_parser("table")
    tab.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "env":
        print(json.dumps(env_report()))
    elif args.cmd == "parity":
        parity(args)
    elif args.cmd == "zero3-train":
        args.flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
        zero3_train(args)
    else:
        print_table(args.out)


if __name__ == "__main__":
    main()
