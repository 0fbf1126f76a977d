"""Text generation (greedy or temperature / top-p sampling) to check that a loaded model is sane.

Usage: ``python -m minilora.generate --model smollm2-135m --prompt "The patient presented with"``.
There is no KV cache: each step re-runs the prefix, which is fine for the short checks this is for.
"""

from __future__ import annotations

import argparse

import torch

from minilora.model import Transformer


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int | None = None,
) -> list[int]:
    """Continue ``prompt_ids``; returns only the new tokens, stopping at ``eos_id``."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    ids = torch.tensor([prompt_ids], device=device)
    out: list[int] = []
    max_len = model.config.max_position_embeddings
    for _ in range(max_new_tokens):
        logits = model(ids[:, -max_len:])[:, -1]
        nxt = sample_next(logits, temperature, top_p, gen)
        tok = int(nxt.item())
        if eos_id is not None and tok == eos_id:
            break
        out.append(tok)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return out


def main(argv: list[str] | None = None) -> int:
    from minilora.cli import InputError, nonneg_float, nonneg_int, positive_int, unit_interval
    from minilora.loading import from_pretrained

    p = argparse.ArgumentParser(prog="python -m minilora.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="HF directory, .gguf, llama2.c .bin, or smollm2-135m")
    p.add_argument("--prompt", default="", help="prompt text (empty: start from BOS when the model uses one)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=unit_interval, default=1.0, help="nucleus sampling threshold, in (0, 1]")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the ChatML template (instruct models)")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = from_pretrained(args.model, dtype=args.dtype, device=device)
    if tok is None:
        raise InputError(f"{args.model}: no tokenizer found beside the model")
    text = args.prompt
    if args.chat:
        text = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text, bos=tok.add_bos and not args.chat)
    new = generate(model, ids, args.max_new_tokens, args.temperature, args.top_p, tok.eos_id, args.seed)
    print(args.prompt + tok.decode(new) if not args.chat else tok.decode(new))
    return 0


if __name__ == "__main__":
    from minilora.cli import run_cli

    run_cli(main)
