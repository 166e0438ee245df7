"""GradCache: one contrastive step over a large batch, with activation memory bounded by a chunk.

Three passes (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): (1) encode every chunk without autograd, keeping only the embeddings;
(2) compute the loss on the concatenated embeddings and its gradient w.r.t. them;
(3) re-encode each chunk with autograd and backpropagate that chunk's slice of the cached
gradient. The loss reaches the parameters only through the embeddings, so the parameter
gradients equal those of the un-chunked step. The RNG state is captured before each chunk
in (1) and restored before its re-encoding in (3), so dropout draws the same masks twice.
"""

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Sequence

import torch


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def grad_cache_step(
    encode_fn: Callable[[Any], torch.Tensor],
    streams: Sequence[Sequence[Any]],
    loss_fn: Callable[..., torch.Tensor],
    no_sync: Callable[[], ContextManager] | None = None,
) -> torch.Tensor:
    """Run forward and backward of `loss_fn(encode(all chunks))` chunk by chunk; return the loss.

    encode_fn: chunk -> (n_chunk, D) embeddings; any model call (a PackedBatch through the
        model and pooling, say). It must be a pure function of the chunk, the parameters and
        the RNG state (dropout is fine; BatchNorm running statistics would update twice).
    streams: one sequence of chunks per input stream, e.g. [query_chunks, target_chunks,
        negative_chunks]; chunks of a stream may differ in size.
    loss_fn: called once as loss_fn(E_1, ..., E_k) with E_s the dim-0 concatenation of
        stream s's chunk embeddings, in order; returns a scalar (e.g. `gathered_infonce`).
    no_sync: optional context factory (DDP's `model.no_sync`) entered around every
        re-encoding except the last, so a data-parallel wrapper reduces gradients once.

    Gradients accumulate into the parameters' .grad as one `loss.backward()` would; the
    returned loss is detached. Peak activation memory is that of the largest chunk.
    """
    states, embeddings = [], []
    with torch.no_grad():
        for stream in streams:
            outs = []
            for chunk in stream:
                states.append(_rng_state())
                outs.append(encode_fn(chunk))
            embeddings.append(outs)
    sizes = [[e.shape[0] for e in outs] for outs in embeddings]
    cached = [torch.cat(outs).detach().requires_grad_() for outs in embeddings]
    with torch.enable_grad():
        loss = loss_fn(*cached)
        grads = torch.autograd.grad(loss, cached, allow_unused=True, materialize_grads=True)
    after = _rng_state()

    jobs = [
        (chunk, g)
        for stream, grad, n in zip(streams, grads, sizes)
        for chunk, g in zip(stream, grad.split(n))
    ]
    with torch.enable_grad():
        for k, ((chunk, grad), state) in enumerate(zip(jobs, states)):
            _set_rng_state(state)
            sync_ctx = no_sync() if (no_sync is not None and k < len(jobs) - 1) else nullcontext()
            with sync_ctx:
                torch.autograd.backward(encode_fn(chunk), grad)
    _set_rng_state(after)
    return loss.detach()
