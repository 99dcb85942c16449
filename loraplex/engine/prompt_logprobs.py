"""Prompt logprobs (vLLM's `prompt_logprobs`, what `echo` + `logprobs` needs): the logprob of
each prompt token under the model, and the top k there, computed in the prefill pass.

A prefill chunk of a request that asks for them also sends its prompt positions through the
final norm and lm_head (position i's logits predict prompt token i + 1; the last prompt
position is the sampled row, as for every request). Those rows' hidden states come from the
step's one forward, so an adapter's LoRA deltas are in them as in every other row. On the
device: log_softmax, the next prompt token's logprob and rank, the top k, packed per row in fp64 as
`sampling._logprobs` packs them (exact for fp32 values and any token id), one tensor for all
the step's prompt rows; its copy to the host is queued behind the step and waited for when
the step lands (`PromptLogprobs.land`), never at launch.

Memory: the logits are made `ROWS_PER_CHUNK` rows at a time, so the transient is bounded by
ROWS_PER_CHUNK x vocab x 8 bytes (the fp32 logits and their fp32 log_softmax; in bf16 the
lm_head output, 2 bytes, lives only until its fp32 copy): 256 MiB at a 128k vocabulary,
whatever the chunk length (a 2048-token chunk at once would be 1 GiB for the logits alone).

Each position is computed once: `Request.prompt_logprobs_done` counts the prompt positions
already launched, so a preempted request's recompute skips them; results are appended to
`Request.prompt_logprobs` ([None] first: nothing predicts the first token) as steps land, in
launch order, and go out whole on the request's first output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .request import Request, Status
from .sampling import TokenLogprob, device_to_host, on_device

ROWS_PER_CHUNK = 256  # prompt rows per lm_head + log_softmax (see the memory bound above)


@dataclass(slots=True)
class PromptRows:
    """The prompt positions of one step that need logprobs, in the flat batch's row order."""

    rows: list[int]                           # rows of the flat batch
    targets: list[int]                        # the next prompt token of each row
    segments: list[tuple[Request, int, int]]  # (request, first prompt position, end), in row order
    k: int                                    # top k of the widest request


def prompt_rows(sched) -> PromptRows | None:
    """The rows of `sched`'s prefill chunks (laid out first, in order, as the runner lays them
    out) whose prompt logprobs are wanted and not yet computed; None when there are none (the
    step then runs exactly as without the feature)."""
    rows: list[int] = []
    targets: list[int] = []
    segments: list[tuple[Request, int, int]] = []
    k = 0
    start = 0
    for req, n in sched.prefills:
        first = req.num_computed
        if req.params.prompt_logprobs is not None:
            lo = max(first, req.prompt_logprobs_done)
            hi = min(first + n, len(req.prompt_ids) - 1)  # the last prompt position is sampled
            if hi > lo:
                rows += range(start + lo - first, start + hi - first)
                targets += req.prompt_ids[lo + 1: hi + 1]
                segments.append((req, lo, hi))
                k = max(k, req.params.prompt_logprobs)
        start += n
    return PromptRows(rows, targets, segments, k) if rows else None


def compute(model, x: torch.Tensor, residual: torch.Tensor | None, wanted: PromptRows) -> PromptLogprobs:
    """Queue the prompt logprobs of `wanted` from the step's last hidden states on the device,
    and their copy to the host; marks the positions done on their requests."""
    device = x.device
    rows = on_device(wanted.rows, device, torch.int64)
    targets = on_device(wanted.targets, device, torch.int64)
    k = min(wanted.k, model.config.vocab_size)
    parts = []
    for lo in range(0, len(wanted.rows), ROWS_PER_CHUNK):
        chunk = rows[lo: lo + ROWS_PER_CHUNK]
        logp = torch.log_softmax(model.logits(x, residual, chunk), dim=-1)
        chosen = logp.gather(1, targets[lo: lo + ROWS_PER_CHUNK].unsqueeze(1))
        rank = (logp > chosen).sum(dim=1, keepdim=True) + 1  # vLLM reports it for the prompt's token
        packed = [chosen, rank]
        if k > 0:
            top_values, top_ids = logp.topk(k, dim=-1)
            packed += [top_values, top_ids]
        parts.append(torch.cat([p.double() for p in packed], dim=1))
        del logp
    packed = parts[0] if len(parts) == 1 else torch.cat(parts)
    ready = None
    if device.type == "cuda":  # a copy queued behind the step; `land` waits for it alone
        packed = device_to_host(packed)
        ready = torch.cuda.Event()
        ready.record()
    for req, _, end in wanted.segments:
        req.prompt_logprobs_done = end
    return PromptLogprobs(wanted, packed, ready)


@dataclass(slots=True)
class PromptLogprobs:
    """One step's prompt logprobs on their way to the host."""

    wanted: PromptRows
    packed: torch.Tensor             # [rows, 2 + 2k] fp64: next token | its rank | top values | top ids
                                     # (on the host on CUDA)
    ready: torch.cuda.Event | None   # recorded after the copy to `packed` (CUDA)

    def land(self) -> None:
        """Wait for the values and append them to their requests (those that finished since
        the launch are skipped)."""
        if self.ready is not None:
            self.ready.synchronize()
        values = self.packed.tolist()
        k = (self.packed.shape[1] - 2) // 2
        i = 0
        for req, lo, hi in self.wanted.segments:
            want = req.params.prompt_logprobs
            if req.status is not Status.FINISHED and req.prompt_logprobs is not None:
                req.prompt_logprobs.extend(
                    TokenLogprob(token_id=self.wanted.targets[i + j], logprob=row[0], rank=int(row[1]),
                                 top=[(int(row[2 + k + t]), row[2 + t]) for t in range(min(want, k))])
                    for j, row in enumerate(values[i: i + hi - lo]))
            i += hi - lo
