"""Batching across requests: one inference thread that predicts the requests waiting for the same model
together, so concurrent load costs fewer, larger ONNX Runtime calls."""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

from stages.servable import Servable


class Batcher:
    """Predictions in one worker thread, several requests at a time: the requests that arrive while the
    model is busy are predicted together in its next call (up to `max_examples` examples), so under
    concurrent load each call does more work for the same per-call cost, and with one request at a time
    nothing waits for company. Requests are only grouped with others for the same model object, so a
    swap never mixes versions."""

    def __init__(self, max_examples: int) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.max_examples = max_examples
        threading.Thread(target=self._work, name="predict", daemon=True).start()

    async def predict(self, model: Servable, examples: Any) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.jobs.put((model, examples, future, loop))
        return await future

    def _work(self) -> None:
        held = None
        while True:
            group = [held or self.jobs.get()]
            held, n = None, len(group[0][1])
            while n < self.max_examples:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job[0] is not group[0][0] or n + len(job[1]) > self.max_examples:
                    held = job
                    break
                group.append(job)
                n += len(job[1])
            model = group[0][0]
            try:
                batch = model.adapter.join([job[1] for job in group])
                answers, start = model.predict(batch), 0
                for _, examples, future, loop in group:
                    loop.call_soon_threadsafe(_settle, future, answers[start : start + len(examples)], None)
                    start += len(examples)
            except Exception as e:  # noqa: BLE001 - handed to each waiting request, which answers 500
                for _, _, future, loop in group:
                    loop.call_soon_threadsafe(_settle, future, None, e)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if not future.done():  # the client may have gone away meanwhile
        future.set_exception(error) if error is not None else future.set_result(result)
