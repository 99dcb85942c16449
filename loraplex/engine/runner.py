"""Turns a scheduled step into tensors, runs the model and returns the logits to sample.

With async scheduling a decoding sequence's newest token may still be on the device, sampled
by the step in flight: its input id is then taken from that step's tokens, on the device
(`pending_tokens`), so that building this step never waits for the previous one."""

from __future__ import annotations

import torch

from ..kernels.lora import BatchMeta
from ..model.llama import CausalLM
from ..model.step import StepMeta
from . import prompt_logprobs
from .cuda_graphs import DecodeGraphs
from .prompt_logprobs import PromptLogprobs
from .request import Request
from .sampling import on_device
from .scheduler import ScheduledStep


class ModelRunner:
    def __init__(self, model: CausalLM, block_size: int, graphs: DecodeGraphs | None = None):
        self.model = model
        self.block_size = block_size
        self.device = model.device
        self.graphs = graphs  # replays decode-only steps when set (CUDA)

    def _to_device(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return on_device(values, self.device, dtype)

    def _rows(self, table: list[int], start: int, end: int) -> list[int]:
        """Flat KV cache rows of positions start .. end-1 of a sequence with block `table`."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _tables(self, tables: list[list[int]]) -> torch.Tensor:
        """Block tables [len(tables), widest] int32, zero-padded."""
        width = max(map(len, tables), default=0)
        flat = [b for t in tables for b in t + [0] * (width - len(t))]
        return self._to_device(flat, torch.int32).view(len(tables), width)

    def _decode_tables(self, decodes: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables [D, widest] int32 (zero-padded) and lengths [D] int32 of decode sequences."""
        return (self._tables([r.block_table for r in decodes]),
                self._to_device([r.num_tokens for r in decodes], torch.int32))

    def _input_ids(self, decodes_first: int, ids: list[int], decodes: list[Request],
                   pending_tokens: torch.Tensor | None) -> torch.Tensor:
        """`ids` on the device, with the rows of decodes whose input token is pending (ids
        `decodes_first` + i for decodes[i]) filled from `pending_tokens`, the draw in flight."""
        dev = self._to_device(ids, torch.int64)
        waiting = [(decodes_first + i, r.pending_row) for i, r in enumerate(decodes) if r.pending]
        if waiting:
            if pending_tokens is None:
                raise RuntimeError("a decode's input token is pending but no step is in flight")
            rows, src = zip(*waiting)
            dev.index_copy_(0, self._to_device(list(rows), torch.int64),
                            pending_tokens.index_select(0, self._to_device(list(src), torch.int64)))
        return dev

    def prepare(self, sched: ScheduledStep, pending_tokens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, StepMeta, list[Request]]:
        """Flat batch: prompt chunks first, then decode tokens. Returns input ids, the step's
        metadata and the requests to sample, in the order of `step.logits_rows`."""
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        lora_slots: list[int] = []
        logits_rows: list[int] = []
        sampled: list[Request] = []
        cu_seqlens, contexts, prefill_tables = [0], [], []
        for req, n in sched.prefills:
            start, first = len(ids), req.num_computed
            if req.pending:  # a prompt chunk reads only tokens the host has
                raise RuntimeError(f"request {req.request_id} is prefilled with a token still pending")
            ids += (req.all_ids if first + n > len(req.prompt_ids) else req.prompt_ids)[first: first + n]
            positions += range(first, first + n)
            rows += self._rows(req.block_table, first, first + n)
            lora_slots += [req.lora_slot] * n
            cu_seqlens.append(start + n)
            contexts.append(first)
            prefill_tables.append(req.block_table[: -(-(first + n) // self.block_size)])
            if first + n == req.num_tokens:  # the prompt is complete: sample the next token
                logits_rows.append(start + n - 1)
                sampled.append(req)
        decode_start = len(ids)
        for req in sched.decodes:
            pos = req.num_tokens - 1
            logits_rows.append(len(ids))
            ids.append(0 if req.pending else req.last_token)  # a pending token is filled in on the device
            positions.append(pos)
            rows += self._rows(req.block_table, pos, pos + 1)
            lora_slots.append(req.lora_slot)
            sampled.append(req)

        tables, seq_lens = self._decode_tables(sched.decodes)
        dev_positions = self._to_device(positions, torch.int64)
        cos, sin = self.model.rope(dev_positions)
        lora = None
        if self.model.lora_slots and any(s >= 0 for s in lora_slots):
            lora = BatchMeta.build(self._to_device(lora_slots, torch.int32), self.model.lora_slots)
        step = StepMeta(
            positions=dev_positions,
            slot_mapping=self._to_device(rows, torch.int64),
            cos=cos, sin=sin,
            prefill_cu_seqlens=self._to_device(cu_seqlens, torch.int32) if contexts else None,
            prefill_context_lens=self._to_device(contexts, torch.int32) if contexts else None,
            prefill_block_tables=self._tables(prefill_tables) if contexts else None,
            decode_start=decode_start,
            decode_block_tables=tables,
            decode_seq_lens=seq_lens,
            lora=lora,
            logits_rows=self._to_device(logits_rows, torch.int64),
        )
        return self._input_ids(decode_start, ids, sched.decodes, pending_tokens), step, sampled

    def run(self, sched: ScheduledStep, pending_tokens: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, list[Request], PromptLogprobs | None]:
        """Logits [len(sampled), V] fp32 for the requests that get a new token this step, and
        the prompt logprobs of the step's prefill chunks that ask for them (queued on the
        device, see `prompt_logprobs.py`; None when none do).
        `pending_tokens`: the tokens of the step in flight (async scheduling), else None."""
        if self.graphs is not None and not sched.prefills and len(sched.decodes) <= self.graphs.max_batch:
            return self._replay(sched.decodes, pending_tokens), sched.decodes, None
        input_ids, step, sampled = self.prepare(sched, pending_tokens)
        wanted = prompt_logprobs.prompt_rows(sched) if sched.prefills else None
        if wanted is None:
            return self.model(input_ids, step), sampled, None
        x, residual = self.model.hidden_states(input_ids, step)
        logits = self.model.logits(x, residual, step.logits_rows)
        return logits, sampled, prompt_logprobs.compute(self.model, x, residual, wanted)

    def _replay(self, decodes: list[Request], pending_tokens: torch.Tensor | None) -> torch.Tensor:
        tables, seq_lens = self._decode_tables(decodes)
        pos = [r.num_tokens - 1 for r in decodes]
        return self.graphs.run(
            input_ids=self._input_ids(0, [0 if r.pending else r.last_token for r in decodes], decodes,
                                      pending_tokens),
            positions=self._to_device(pos, torch.int64),
            slot_mapping=self._to_device([row for r, p in zip(decodes, pos) for row in self._rows(r.block_table, p, p + 1)],
                                         torch.int64),
            lora_slots=self._to_device([r.lora_slot for r in decodes], torch.int32),
            block_tables=tables,
            seq_lens=seq_lens,
        )
