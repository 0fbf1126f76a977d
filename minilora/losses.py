"""Causal-LM loss through a fused, chunked LM head + cross-entropy that never builds full-vocabulary logits.

The forward computes each chunk's logits, its loss and, when a gradient will be needed, the gradient with respect
to the hidden states (``(softmax - onehot) @ W``) at once; backward only scales that stored gradient. Between the
two GEMMs of a chunk, the cross-entropy rows take one kernel where there is one (kernels/cpu.c in bf16 on the CPU,
kernels/rowwise.py's Triton kernel on CUDA; frozen head only), else PyTorch ops over an fp32 copy. Peak extra
memory is one chunk of logits instead of ``[B*T, V]`` fp32 logits (SmolLM2: 49,152 x 4 bytes per token).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from kernels import cpu as cpu_kernels

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**24  # logits elements per chunk (64 MB in fp32)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype


# A frozen weight's contiguous transpose, per weight tensor (dropped with it), remade when the weight changes:
# id(weight) -> (weak reference to it, (address, version), transpose). Tensors cannot be weak dict keys (their
# == is elementwise).
_TRANSPOSED: dict[int, tuple] = {}


def _transposed(w: torch.Tensor) -> torch.Tensor:
    """``w.T`` as a contiguous [D, V] copy, cached: oneDNN runs the [rows, D] x [D, V] logits GEMM much faster
    from it than from the transposed view of the [V, D] weight (SmolLM2's head, 341-row chunks, 2 cores: 56 against
    93 ms a step; the whole bf16 training step 3% faster)."""
    key = (w.data_ptr(), w._version)
    hit = _TRANSPOSED.get(id(w))
    if hit is None or hit[0]() is not w or hit[1] != key:
        ident = id(w)
        ref = weakref.ref(w, lambda _: _TRANSPOSED.pop(ident, None))
        hit = _TRANSPOSED[ident] = (ref, key, w.detach().t().contiguous())
    return hit[2]


def _fused_rows(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, rows: int, need_h: bool, ce_rows_,
                wt: torch.Tensor, check_targets: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(summed loss, its gradient w.r.t. h or None) with logits in w's dtype and a one-pass cross-entropy kernel:
    kernels/cpu.c's on the CPU (bf16), kernels/rowwise.py's Triton one on CUDA. ``wt``: ``w.T`` for the logits GEMM
    (on the CPU a cached contiguous copy, which oneDNN runs faster).

    No fp32 copy of the logits: the kernel reads each row, computes the loss in fp32 and, for the gradient,
    overwrites the row with ``softmax - onehot``, which the next GEMM turns into the rows of ``dL/dh``.
    """
    V = w.shape[0]
    # kernels/cpu.c indexes rows with y: check it first (the Triton kernel needs no check, which would make the
    # host wait for the GPU: it reads no logit for a target outside the vocabulary and gives the row a NaN loss)
    if check_targets and y.numel() and bool(((y < 0) | (y >= V)).any()):
        raise ValueError(f"target token ids must lie in [0, {V}) (the LM head's vocabulary), got "
                         f"[{int(y.min())}, {int(y.max())}]")
    n = h.shape[0]
    buf = torch.empty(rows, V, dtype=w.dtype, device=h.device)
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    grad_h = torch.empty(h.shape, dtype=w.dtype, device=h.device) if need_h else None
    for i in range(0, n, rows):
        hc = h[i : i + rows].to(w.dtype)
        logits = buf[: hc.shape[0]]
        torch.mm(hc, wt, out=logits)
        total += ce_rows_(logits, y[i : i + rows], grad=need_h).sum(dtype=torch.float64)
        if need_h:
            torch.mm(logits, w, out=grad_h[i : i + rows])
    return total.float(), grad_h if grad_h is None else grad_h.to(h.dtype)


def _row_kernel(h: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, need_w: bool) -> str | None:
    """Which one-pass cross-entropy rows kernel computes the loss of ``h @ weight^T`` in ``dtype``: "cpu"
    (kernels/cpu.c, bf16 on the CPU), "triton" (``kernels.rowwise``, where ``minilora.ops`` runs its Triton
    kernels: CUDA, or the interpreter in tests), or None (PyTorch ops; a head that is trained always)."""
    if need_w:
        return None
    if dtype == torch.bfloat16 and weight.device.type == "cpu" and cpu_kernels.library() is not None:
        return "cpu"
    from minilora.ops import _triton_rowwise

    return "triton" if _triton_rowwise(h) is not None else None


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ W^T`` against targets ``y`` (no ignored entries), chunked over rows."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(dtype)
        n, V = h.shape[0], weight.shape[0]
        rows = min(n, max(1, CHUNK_ELEMENTS // V))
        ctx.weight_dtype = weight.dtype
        kernel = _row_kernel(h, weight, dtype, need_w)
        if kernel is not None:
            if kernel == "cpu":
                ce_rows_, wt = cpu_kernels.cross_entropy_rows_, _transposed(w)
            else:
                from kernels import rowwise

                ce_rows_, wt = rowwise.cross_entropy_rows_, w.T
            total, grad_h = _fused_rows(h, w, y, rows, need_h, ce_rows_, wt, check_targets=kernel == "cpu")
            ctx.save_for_backward(grad_h, None)
            return total
        acc = torch.promote_types(dtype, torch.float32)
        # One logits buffer (and its fp32 view of the same values when computing in 16 bits), reused by every
        # chunk: fresh 10-100 MB tensors per chunk cost page faults, and mixed-dtype ops take slow paths on CPU.
        # fp32 on the CPU: the logits come from kernels.cpu.fp32_linear (oneDNN on AMD CPUs, where it took a third
        # off this GEMM against MKL on an AVX2 EPYC), into a tensor of its own per chunk
        own = dtype == torch.float32 and h.device.type == "cpu"
        buf = None if own else torch.empty(rows, V, dtype=dtype, device=h.device)
        buf32 = buf if acc == dtype else torch.empty(rows, V, dtype=acc, device=h.device)
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty(h.shape, dtype=dtype, device=h.device) if need_h else None  # the GEMM's out dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        for i in range(0, n, rows):
            hc, yc = h[i : i + rows].to(dtype), y[i : i + rows]
            r = hc.shape[0]
            if own:
                logits = lf = cpu_kernels.fp32_linear(hc, w)
            else:
                logits, lf = buf[:r], buf32[:r]
                torch.mm(hc, w.T, out=logits)
            if lf is not logits:
                lf.copy_(logits)
            target = lf.gather(1, yc[:, None])
            peak = lf.amax(dim=-1, keepdim=True)
            p = lf.sub_(peak).exp_()  # unnormalised softmax, in place (torch.logsumexp would copy)
            norm = p.sum(dim=-1, keepdim=True)
            total += (peak + norm.log() - target).sum()
            if need_h or need_w:
                # softmax - onehot = (p - norm * onehot) / norm: the one-hot goes in before rounding (no
                # cancellation later) and the 1 / norm row scaling is applied to the [rows, D] product instead of
                # to the [rows, V] probabilities
                p[torch.arange(r, device=p.device), yc] -= norm.squeeze(1)
                inv = norm.reciprocal_()
            if need_h:
                if p is not logits:
                    logits.copy_(p)
                gh = grad_h[i : i + rows]
                torch.mm(logits, w, out=gh)
                gh.mul_(inv)  # fp32 scale on the small [rows, D] block
            if need_w:
                grad_w.addmm_(p.mul_(inv).T, hc.to(acc))
        ctx.save_for_backward(grad_h if grad_h is None else grad_h.to(h.dtype), grad_w)
        return total.float()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def lm_loss_sum(hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss, number of predicted tokens) for hidden [B, T, D] and labels [B, T] (-100: none).

    Position t predicts ``labels[:, t + 1]`` (the shift is done here, as in Hugging Face). With the Triton rows
    (CUDA) nothing here waits for the device: the count stays a device tensor, and a target outside the vocabulary
    gives a NaN loss rather than the ValueError of the other paths.
    """
    dtype = _compute_dtype(hidden)
    need_w = torch.is_grad_enabled() and lm_head.weight.requires_grad
    if hidden.numel() and _row_kernel(hidden, lm_head.weight, dtype, need_w) == "triton":
        # the kernel gives ignored rows a zero loss and gradient: every position goes in, the last of each sequence
        # with an ignored target, so that h is a view of hidden (no copy, and no scatter of its gradient back), no
        # boolean index makes the host wait for the device, and the count stays there
        y = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
        loss = LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), lm_head.weight, y, dtype)
        return loss, (y != IGNORE_INDEX).sum(dtype=torch.float32)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]
    if y.numel() == 0:
        return hidden.sum() * 0.0, torch.zeros((), device=hidden.device)
    loss = LinearCrossEntropy.apply(h, lm_head.weight, y, dtype)
    return loss, torch.tensor(float(y.numel()), device=hidden.device)


def lm_loss_reference(hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """The plain formula (full logits), as a test oracle: summed next-token cross-entropy."""
    logits = lm_head(hidden[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
