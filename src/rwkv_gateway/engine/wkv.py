"""The WKV recurrence of RWKV-7 for a batch of [B, H, N, N] float32 states, in three forms that compute
the same function: `wkv_one` for a decode step (one token per row), `wkv_loop` token by token for short
prompt chunks, and `wkv_chunked` for longer ones (a fixed number of batched products per 32-token chunk,
which is what keeps a long prompt from being launch-bound on a GPU). The batched backend
(`backend_batched_v7.py`) picks the form; the math mirrors `RWKV_x070_TMix_one/_seq` of rwkv 0.8.x.
"""

from __future__ import annotations

import torch

#: A decode step updates the WKV states in slices of about this many bytes, so that the three passes
#: over a slice (read for the products, decay, rank-2 update) run in the L2 cache instead of memory.
SLICE_BYTES = 3 << 20
#: The chunk length of `wkv_chunked` (the largest; shorter prompts use the power of two at or above).
CHUNK = 32
#: Prompt chunks from this many tokens on take `wkv_chunked` (shorter ones the token loop `wkv_loop`).
CHUNKED_FROM = 16


def wkv_loop(
    state: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kk: torch.Tensor,
    a: torch.Tensor,
    *,
    n_head: int,
    head_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The WKV recurrence over T for [B, H, N, N] float32 states; returns (y [B, T, C] fp32, state).

    The package's update is `S = S * w + S @ ab + v k^T` with `ab = (-kk) (kk * a)^T`. Since ab has
    rank 1, `S @ ab = (S @ -kk) (kk * a)^T`: a matrix-vector product and an outer product instead
    of a full [N, N] x [N, N] product per head (10 ms against 17 ms per layer at B=64 with 12
    heads of 64, on the 2-core CPU this was written on). S[h, i, j] has i indexing values and j
    keys, so w, kk * a and k broadcast along the last axis.
    The input state is only read; the first step writes a new tensor that later steps update in
    place, so a long prompt chunk allocates nothing per token and the state stays in cache.
    """
    B, T, C = r.shape
    H, N = n_head, head_size

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.float().view(B, T, H, N).transpose(0, 1)  # [T, B, H, N], time-major

    w_t = heads(w).unsqueeze(-2).contiguous()  # [T, B, H, 1, N]: scales key columns
    k_t = heads(k).unsqueeze(-2).contiguous()
    b_t = heads(kk * a).unsqueeze(-2).contiguous()
    v_t = heads(v).unsqueeze(-1).contiguous()  # [T, B, H, N, 1]: scales value rows
    nkk = heads(-kk)
    # One batched product per step against two columns: r_t (this step's output) and -kk_{t+1}
    # (the next step's S @ -kk), so the loop runs one matmul per token instead of two.
    q = torch.zeros((T, B * H, N, 2), dtype=torch.float32, device=r.device)
    q[:, :, :, 0] = heads(r).reshape(T, B * H, N)
    q[:-1, :, :, 1] = nkk[1:].reshape(T - 1, B * H, N)
    out = torch.empty_like(q)
    sa = torch.matmul(state, nkk[0].unsqueeze(-1))  # [B, H, N, 1]
    for t in range(T):
        if t == 0:  # a fresh contiguous tensor: the caller's state is never written
            fresh = torch.empty_like(state, memory_format=torch.contiguous_format)
            new = torch.mul(state, w_t[0], out=fresh)
        else:
            new = state.mul_(w_t[t])
        new.addcmul_(sa, b_t[t])
        new.addcmul_(v_t[t], k_t[t])
        state = new
        torch.bmm(state.view(B * H, N, N), q[t], out=out[t])
        sa = out[t, :, :, 1:].view(B, H, N, 1)
    y = out[..., 0].view(T, B, C).transpose(0, 1)
    return y, state


def wkv_chunked(
    state: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kk: torch.Tensor,
    a: torch.Tensor,
    *,
    n_head: int,
    head_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The WKV recurrence of `wkv_loop` computed chunk by chunk: the same (y [B, T, C] fp32, state), equal
    within float32 rounding, with a fixed number of batched products per chunk instead of a few
    kernels per token (on a GPU a long prompt is otherwise launch-bound; on the CPU it is 1.5-2x
    faster than `wkv_loop` from a few dozen tokens on).

    Per head the step is `S_t = S_{t-1} A_t + v_t k_t^T` with `A_t = diag(w_t) + alpha_t b_t^T`,
    `alpha = -kk`, `b = kk * a`. Inside a chunk, with the cumulative decay `g_t = w_1 ... w_t`
    (elementwise) and `u_t = S_{t-1} alpha_t`, induction gives
    `S_t = (S_0 + sum_{s<=t} u_s (b_s / g_s)^T + v_s (k_s / g_s)^T) diag(g_t)`, hence
    `u_t = S_0 (g_{t-1} alpha_t) + sum_{s<t} u_s (b_s/g_s . g_{t-1} alpha_t) + v_s (k_s/g_s . ...)`,
    a unit lower-triangular system `(I - M) U = A S_0^T + K V` over the chunk's L positions. Its
    solution is affine in S_0 (`U = W1 S_0^T + W2`), so every chunk's W1, W2 and the outputs' parts
    that do not depend on S_0 are computed for all chunks at once; only `S_0 [W1; R']^T` and the
    state update (two products) run chunk after chunk. Decays lie in [exp(-0.61), 1], so over a
    chunk of 32 the factors 1/g stay below 3e8: no overflow in float32, and no cancellation (they
    only scale products). Padding (decay 1, k 0, a 0) leaves the state as it is, as in `wkv_loop`.
    """
    B, T, C = r.shape
    H, N = n_head, head_size
    L = min(CHUNK, 1 << (T - 1).bit_length())  # T > 1 here
    n = -(-T // L)
    pad = n * L - T

    def chunks(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        x = x.float().view(B, T, H, N)
        if pad:
            x = torch.cat((x, x.new_full((B, pad, H, N), fill)), dim=1)
        return x.view(B, n, L, H, N)

    w_c, kk_c, k_c = chunks(w, 1.0), chunks(kk), chunks(k)
    b_c = kk_c * chunks(a)
    log_w = torch.log(w_c)
    incl = torch.cumsum(log_w, dim=2)  # log g_t
    excl = incl - log_w  # log g_{t-1}
    inv_g = torch.exp(-incl)
    tail = torch.exp(incl[:, :, -1:] - incl)  # g_L / g_t
    g_last = torch.exp(incl[:, :, -1])  # [B, n, H, N]

    def heads(*parts: torch.Tensor) -> torch.Tensor:
        # [B, n, L, H, N] pieces, joined along L, as [B, H, n, len * L, N] (one copy).
        return torch.cat(parts, dim=2).permute(0, 3, 1, 2, 4)

    lhs = heads(-kk_c * torch.exp(excl), chunks(r) * torch.exp(incl))  # [alpha~; r~]
    rhs = heads(b_c * inv_g, k_c * inv_g)  # [b / g; k / g]
    v_h = heads(chunks(v)).contiguous()  # [B, H, n, L, N]
    scores = lhs @ rhs.transpose(-1, -2)  # [B, H, n, 2L, 2L]: the four L x L blocks below
    m = scores[..., :L, :L].tril(-1)
    k_m = scores[..., :L, L:].tril(-1)
    q = torch.cat((scores[..., L:, :L].tril(), scores[..., L:, L:].tril()), dim=-1)  # [Qb | Qk]
    a_t, r_t = lhs[..., :L, :], lhs[..., L:, :]
    eye = torch.eye(L, dtype=torch.float32, device=r.device)
    # [W1 | W2] = (I - M)^-1 [alpha~ | K V]
    w12 = torch.linalg.solve_triangular(
        eye - m, torch.cat((a_t, k_m @ v_h), dim=-1), upper=False, unitriangular=True
    )
    w1, w2 = w12[..., :N], w12[..., N:]
    # y = S_0 R'^T + Y0 with R' = r~ + Qb W1, Y0 = Qb W2 + Qk V
    y0 = q @ torch.cat((w2, v_h), dim=-2)
    r_prime = r_t + q[..., :L] @ w1
    # Per chunk: [S_0 W1^T | S_0 R'^T] = S_0 [W1; R']^T, and
    # S_L = S_0 diag(g_L) + [U^T | V^T] [b g_L/g; k g_L/g] with U^T = S_0 W1^T + W2^T.
    left = torch.cat((w1, r_prime), dim=-2).transpose(-1, -2)  # [B, H, n, N, 2L]
    right = heads(b_c * tail, k_c * tail)  # [B, H, n, 2L, N]
    w2_t, v_t = w2.transpose(-1, -2), v_h.transpose(-1, -2)  # [B, H, n, N, L]
    g_h = g_last.permute(0, 2, 1, 3).unsqueeze(-2)  # [B, H, n, 1, N]: scales key columns
    ys = []
    for c in range(n):
        prod = state @ left[:, :, c]  # [B, H, N, 2L]
        ys.append(prod[..., L:])
        u_v = torch.cat((prod[..., :L] + w2_t[:, :, c], v_t[:, :, c]), dim=-1)  # [B, H, N, 2L]
        state = torch.baddbmm(
            (state * g_h[:, :, c]).view(B * H, N, N),
            u_v.reshape(B * H, N, 2 * L),
            right[:, :, c].reshape(B * H, 2 * L, N),
        ).view(B, H, N, N)
    y = torch.stack(ys, dim=2).transpose(-1, -2) + y0  # [B, H, n, L, N]
    y = y.permute(0, 2, 3, 1, 4).reshape(B, n * L, C)
    return (y[:, :T] if pad else y), state


def wkv_one(
    state: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kk: torch.Tensor,
    a: torch.Tensor,
    *,
    n_head: int,
    head_size: int,
    in_place: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One WKV step (T = 1) for [B, H, N, N] float32 states: (y [B, 1, C] fp32, new state).

    The same recurrence as `wkv_loop`, `S' = S * w + (S @ -kk) b^T + v k^T` with `b = kk * a`, in
    fewer passes over the states, which at decode batch sizes are far larger than the caches:
    the output is taken from the old state, `S' r = S (w * r) + (S @ -kk)(b . r) + v (k . r)`, so
    one product against two columns [-kk, w * r] reads S once for both, and the two rank-1 terms
    are a single rank-2 `baddbmm_`. The update goes slice by slice (see `SLICE_BYTES`) into
    the input itself when `in_place`, else into a new tensor.
    """
    B, _, C = r.shape
    H, N = n_head, head_size

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.float().reshape(B * H, N)

    r_h, w_h, k_h, v_h, kk_h = heads(r), heads(w), heads(k), heads(v), heads(kk)
    b_h = kk_h * heads(a)
    cols = torch.stack((-kk_h, w_h * r_h), dim=-1)  # [BH, N, 2]
    left = torch.empty_like(cols)  # [S @ -kk, v]: the rank-2 update's left factors
    left[..., 1] = v_h
    right = torch.stack((b_h, k_h), dim=-2)  # [BH, 2, N]
    scale = w_h.unsqueeze(-2)  # [BH, 1, N]: decays the key columns
    old = state.view(B * H, N, N)
    new = old if in_place else torch.empty_like(old)
    prod = torch.empty_like(cols)
    # On a GPU one slice (every extra slice is four more kernel launches).
    step = max(1, SLICE_BYTES // (N * N * 4)) if old.device.type == "cpu" else B * H
    for lo in range(0, B * H, step):
        hi = lo + step
        torch.bmm(old[lo:hi], cols[lo:hi], out=prod[lo:hi])
        left[lo:hi, :, 0] = prod[lo:hi, :, 0]
        torch.mul(old[lo:hi], scale[lo:hi], out=new[lo:hi])
        new[lo:hi].baddbmm_(left[lo:hi], right[lo:hi])
    y = prod[..., 1] + prod[..., 0] * (b_h * r_h).sum(-1, keepdim=True)
    y += v_h * (k_h * r_h).sum(-1, keepdim=True)
    return y.view(B, 1, C), new.view(B, H, N, N)
