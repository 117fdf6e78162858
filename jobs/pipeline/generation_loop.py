"""The loop that feeds the engine from a stream of requests and hands finished rows to the writer."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from engine.outputs import CompletionOutput, RequestError
from jobs.pipeline.progress import Progress, RunStats
from jobs.pipeline.prompts import RequestSpec
from jobs.pipeline.signals import StopSignal
from jobs.pipeline.writer import OutputSink, error_rows, output_rows

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _PendingRequest:
    spec: RequestSpec
    outputs: list[CompletionOutput | None]
    remaining: int


class GenerationLoop:
    """Keeps ``max_in_flight`` sequences added to the engine, steps it, and commits each request once all its samples are done.

    A request's samples are written together, so a committed source row is always complete and a
    resumed run can skip it by id. On a stop signal it stops admitting and stepping, and commits
    what has finished.
    """

    def __init__(
        self,
        engine: Any,
        requests: Iterator[RequestSpec],
        sink: OutputSink,
        *,
        digest: str,
        max_in_flight: int,
        stop: StopSignal,
        progress: Progress,
        stats: RunStats,
    ) -> None:
        self.engine = engine
        self.requests = requests
        self.sink = sink
        self.digest = digest
        self.max_in_flight = max(1, max_in_flight)
        self.stop = stop
        self.progress = progress
        self.stats = stats
        self._in_flight: dict[str, _PendingRequest] = {}
        self._decoded = 0  # tokens decoded so far, from the step records (for the live tokens/s)

    def run(self) -> RunStats:
        """Run until the requests are exhausted and all finished, or a stop signal arrives."""
        exhausted = False
        try:
            while not self.stop.requested:
                if not exhausted:
                    exhausted = self._admit()
                if self.stop.requested or not self.engine.has_unfinished_requests():
                    break
                for out in self.engine.step():
                    self._collect(out)
                self._record_steps()
                self.sink.maybe_commit()
                if self.progress.due():
                    s = self.engine.stats()
                    self.progress.show(self._decoded, s.running, s.kv_blocks_used, s.kv_blocks_total)
        except BaseException:
            self._commit_after_failure()
            raise
        self._record_steps()
        self.sink.commit()
        self.stats.complete = exhausted and not self._in_flight and not self.stop.requested
        return self.stats

    def _record_steps(self) -> None:
        records = self.engine.pop_step_records()
        self._decoded += sum(r.decode_tokens for r in records)
        self.sink.add_steps(records)

    def _admit(self) -> bool:
        """Add requests until enough sequences are in flight; True when the request stream is exhausted."""
        while self.engine.num_unfinished() < self.max_in_flight and not self.stop.requested:
            spec = next(self.requests, None)
            if spec is None:
                return True
            if spec.error is None and self._submit(spec):
                continue
            self._finish(spec, self._error_rows(spec))
            self.sink.maybe_commit()
        return False

    # -- what a request is to the engine, and the rows it becomes (the score job's loop overrides these)
    def _submit(self, spec: RequestSpec) -> bool:
        """Add ``spec`` to the engine; False (with ``spec.error`` set) when the engine refuses it."""
        try:
            self.engine.add_request(spec.id, spec.token_ids, spec.params)
        except RequestError as e:
            spec.error = str(e)
            return False
        self._in_flight[spec.id] = _PendingRequest(spec, [None] * spec.params.n, spec.params.n)
        return True

    def _error_rows(self, spec: RequestSpec) -> list[dict[str, Any]]:
        return error_rows(spec, spec.error, self.digest)

    def _collect(self, out: CompletionOutput) -> None:
        entry = self._in_flight[out.request_id]
        entry.outputs[out.index] = out
        entry.remaining -= 1
        self.stats.completion_tokens += len(out.token_ids)
        if entry.remaining == 0:
            del self._in_flight[out.request_id]
            self._finish(entry.spec, output_rows(entry.spec, entry.outputs, self.digest))

    def _finish(self, spec: RequestSpec, rows: list[dict[str, Any]]) -> None:
        self.sink.add(rows)
        self.stats.source_rows += 1
        self.stats.output_rows += len(rows)
        self.stats.error_rows += sum(r["error"] is not None for r in rows)
        self.stats.prompt_tokens += len(spec.token_ids or ())
        self.progress.advance(1)

    def _commit_after_failure(self) -> None:
        """Keep the finished rows when the loop dies (a bug, a second Ctrl-C); never mask the original error."""
        try:
            self.sink.commit()
        except BaseException as e:
            log.error("could not commit finished rows after a failure: %s", e)
