"""Encoder tokens/s: packed native-resolution batch vs a padded batch with a key-padding mask.

Both paths run the same SigLIP-family CompVisionModel weights (C-RoPE on) on the same mixed-size
images; the baseline pads every image to the longest one and runs the layers on the padded
[N, L, D] batch with a boolean key-padding mask in scaled_dot_product_attention (the MLPs
then also work on padding, as in a padded pipeline). Outputs are checked to agree before timing.

    python benchmarks/bench_encoder.py            # tiny width on CPU (< 1 min)
    python benchmarks/bench_encoder.py --quick
    python benchmarks/bench_encoder.py --so400m --device cuda --dtype bfloat16 [--layers 27] [--backward]

Shape legend: N images, L longest image, T packed tokens, D width, H heads, Dh head dim.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from comp import CompVisionConfig, CompVisionModel
from comp.models.vision.attention import resolve_backend
from comp.models.vision.packing import rowcol_ids
from comp.models.vision.rope2d import apply_rope, rope_cos_sin

# mixed native-resolution grids (patches, h x w), like smart_resize output of varied photos
TINY_GRIDS = [(16, 16), (8, 24), (4, 4), (20, 12), (12, 12), (2, 30), (24, 10), (6, 8)]
SO400M_GRIDS = [(54, 54), (40, 72), (20, 20), (70, 40), (36, 36), (10, 90), (60, 48), (28, 28)] * 2


def build(args) -> CompVisionModel:
    if args.so400m:
        dims = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
                    image_size=384, num_hidden_layers=args.layers or 27)
    else:
        dims = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, image_size=56,
                    num_hidden_layers=args.layers or 4)
    cfg = CompVisionConfig(family="siglip", patch_size=14, use_rope=True, attn_backend=args.backend, **dims)
    torch.manual_seed(0)
    return CompVisionModel(cfg).to(device=args.device, dtype=getattr(torch, args.dtype))


def padded_forward(model: CompVisionModel, x_TK: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
    """The baseline: pad to [N, L, D], mask padded keys, run every layer on the padded batch."""
    cfg = model.config
    lengths = [h * w for h, w in grids]
    n, big, dev = len(grids), max(lengths), x_TK.device
    emb_TD = model.embeddings(x_TK, grids, lengths)
    x_NLD = emb_TD.new_zeros(n, big, cfg.hidden_size)
    keep_NL = torch.zeros(n, big, dtype=torch.bool, device=dev)
    pos_NL2 = torch.zeros(n, big, 2, dtype=torch.long)
    for i, (part, (h, w)) in enumerate(zip(torch.split(emb_TD, lengths), grids)):
        x_NLD[i, : len(part)], keep_NL[i, : len(part)] = part, True
        pos_NL2[i, : len(part)] = rowcol_ids(h, w)
    cos, sin = rope_cos_sin(pos_NL2.view(-1, 2).to(dev), cfg.head_dim, cfg.rope_theta)
    mask_N11L = keep_NL[:, None, None, :]
    heads, dh = cfg.num_attention_heads, cfg.head_dim
    for layer in model.encoder.blocks:
        h_NLD = layer.layer_norm1(x_NLD)
        att = layer.self_attn
        q, k, v = (proj(h_NLD).view(n * big, heads, dh) for proj in (att.q_proj, att.k_proj, att.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.view(n, big, heads, dh).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_N11L)
        x_NLD = x_NLD + att.out_proj(o.transpose(1, 2).reshape(n, big, -1))
        x_NLD = x_NLD + layer.mlp(layer.layer_norm2(x_NLD))
    return x_NLD[keep_NL]


def timed_pair(fns, iters: int, device: str, backward: bool) -> list[float]:
    """Median seconds per step of each fn, steps interleaved so that both see the same load
    (the CPU here is shared; the median resists the noise)."""
    def step(fn):
        if backward:
            fn().float().square().mean().backward()
        else:
            with torch.no_grad():
                fn()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for fn in fns:
        step(fn)
        step(fn)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, bucket in zip(fns, times):
            sync()
            start = time.perf_counter()
            step(fn)
            sync()
            bucket.append(time.perf_counter() - start)
    return [sorted(b)[len(b) // 2] for b in times]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--so400m", action="store_true", help="SigLIP-So400M shape (1152 wide, 16 heads of 72)")
    p.add_argument("--layers", type=int, default=None, help="blocks (default 4 tiny, 27 so400m)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backend", default="auto", choices=["auto", "flash", "varlen", "sdpa"])
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="3 iterations, half the images")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the CPU here is shared)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    grids = SO400M_GRIDS if args.so400m else TINY_GRIDS
    if args.quick:
        grids, args.iters = grids[: len(grids) // 2], 3
    model = build(args)
    gen = torch.Generator().manual_seed(0)
    k = 3 * 14 * 14
    x_TK = torch.randn(sum(h * w for h, w in grids), k, generator=gen)
    x_TK = x_TK.to(args.device, getattr(torch, args.dtype))
    grid_N3 = torch.tensor([[1, h, w] for h, w in grids])

    with torch.no_grad():
        diff = (model(x_TK, grid_N3).float() - padded_forward(model, x_TK, grids).float()).abs().max()
    tokens, padded = x_TK.shape[0], len(grids) * max(h * w for h, w in grids)
    backend = resolve_backend(args.backend, x_TK.device, x_TK.dtype)
    t_packed, t_padded = timed_pair(
        [lambda: model(x_TK, grid_N3), lambda: padded_forward(model, x_TK, grids)],
        args.iters, args.device, args.backward)
    cfg = model.config
    print(f"shape: {cfg.num_hidden_layers} layers x {cfg.hidden_size} wide, {cfg.num_attention_heads} heads "
          f"of {cfg.head_dim}; {args.device} {args.dtype}; {'fwd+bwd' if args.backward else 'fwd'}")
    print(f"batch: {len(grids)} images, {tokens} tokens packed, {padded} padded "
          f"({padded / tokens:.2f}x); max |packed - padded| = {diff.item():.2e}")
    print(f"packed ({backend}):".ljust(26)
          + f"{tokens / t_packed:12.0f} tokens/s  ({t_packed * 1e3:.1f} ms)")
    print("padded + key mask (sdpa):".ljust(26)
          + f"{tokens / t_padded:12.0f} tokens/s  ({t_padded * 1e3:.1f} ms)")
    print(f"ratio packed / padded: {t_padded / t_packed:.2f}x")


if __name__ == "__main__":
    main()
