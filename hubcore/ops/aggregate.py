"""The ops socket of a hub of several workers ([server] workers > 1),
served by their supervisor: the same routes as one hub's (ops.server),
answered by asking each worker on its own ops socket and putting the
answers together (ops.merge). `hubcore stats`, `keys`, `reload` work
against it unchanged.

GET /stats and /metrics merge the answers of the workers that answer in
time; a command (any POST) goes to every worker that runs and answers ok
only if each did; any other GET (/route/explain) is the first worker's.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Protocol

import h11
import orjson

from hubcore.http.h11server import Reply
from hubcore.ops import merge
from hubcore.ops.client import MAX_RESPONSE, OpsClientError, failed_exchange
from hubcore.ops.metrics import PROMETHEUS_CONTENT_TYPE
from hubcore.ops.server import JSON, UnixSocketServer, json_error, json_reply

log = logging.getLogger("hubcore.ops")

# Seconds a worker has to answer a read (/stats, /metrics): within the 5 s
# the CLI waits for the supervisor, so a worker that hangs is left out of the
# sum instead of failing `hubcore stats`.
READ_TIMEOUT = 2.0
# Seconds a worker has to carry out a command (a reload reads the config
# and the tokens): still within the CLI's 5 s.
COMMAND_TIMEOUT = 4.0


class WorkerRoster(Protocol):
    """What the ops socket asks of the supervisor."""

    started_at: float            # unix time the supervisor started
    count: int                   # workers configured

    def listening(self) -> list[tuple[int, str]]:
        """(index, ops socket) of each worker that answered since it started."""
        ...

    def roster(self) -> list[dict[str, Any]]:
        """One row per worker: index, pid, up, restarts."""
        ...

    def starting(self) -> str | None:
        """Why the hub does not answer yet (its workers are starting), or None."""
        ...


async def ask(socket_path: str, target: str, method: str = "GET", *, timeout: float) -> tuple[int, str, bytes]:
    """One request to an ops socket: (status, content type, body); raises
    OpsClientError (a timeout, a refused or broken connection, a bad answer)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(socket_path)
            try:
                return await _exchange(reader, writer, method, target)
            finally:
                writer.close()
    except (OSError, h11.ProtocolError) as e:  # TimeoutError among them
        raise failed_exchange(e, socket_path, timeout) from e


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, target: str,
) -> tuple[int, str, bytes]:
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method=method, target=target, headers=[
        ("host", "hubcore"), ("content-length", "0"), ("connection", "close"),
    ])
    writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
    status, content_type, body = 0, "", bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(64 * 1024))
        elif isinstance(event, h11.Response):
            status = event.status_code
            content_type = dict(event.headers).get(b"content-type", b"").decode("latin-1")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_RESPONSE:
                raise OpsClientError(f"ops response larger than {MAX_RESPONSE} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return status, content_type, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise OpsClientError("the worker closed the ops connection before answering")


class AggregateOpsServer(UnixSocketServer):
    """The supervisor's ops socket: the workers' answers, put together."""

    def __init__(self, path: str, workers: WorkerRoster, *, mode: int = 0o660, group: str | None = None) -> None:
        super().__init__(path, mode=mode, group=group)
        self.workers = workers

    async def dispatch(self, head: h11.Request, body: bytes, peer: str) -> Reply:
        method = head.method.decode("ascii", "replace")
        target = head.target.decode("ascii", "replace")
        path = target.split("?", 1)[0]
        why = self.workers.starting()
        if why is not None:
            return json_error(503, why)
        try:
            if method == "GET" and path == "/stats":
                return await self._stats()
            if method == "GET" and path == "/metrics":
                return await self._metrics()
            if method == "GET" and path == "/live":
                return await self._live()
            if method == "POST":
                return await self._command(target, path)
            if method == "GET":
                return await self._first(target)
        except OpsClientError as e:
            return json_error(503, str(e))
        return json_error(405, f"no ops route takes {method}")

    # -- reads --------------------------------------------------------------------

    async def _gather(self, target: str, timeout: float) -> list[tuple[int, tuple[int, str, bytes] | OpsClientError]]:
        listening = self.workers.listening()
        answers = await asyncio.gather(
            *(ask(socket, target, timeout=timeout) for _, socket in listening), return_exceptions=True,
        )
        out: list[tuple[int, tuple[int, str, bytes] | OpsClientError]] = []
        for (index, _), answer in zip(listening, answers):
            if isinstance(answer, OpsClientError):
                log.warning("worker %d did not answer %s: %s", index, target, answer)
            elif isinstance(answer, BaseException):
                raise answer
            out.append((index, answer))
        return out

    async def _answers(self, target: str) -> list[tuple[int, bytes]]:
        """The 200 answers of the workers that gave one in time, in worker order."""
        return [
            (index, answer[2]) for index, answer in await self._gather(target, READ_TIMEOUT)
            if not isinstance(answer, OpsClientError) and answer[0] == 200
        ]

    async def _stats(self) -> Reply:
        stats, metrics = await asyncio.gather(self._answers("/stats"), self._answers("/metrics"))
        if not stats:
            return json_error(503, "no worker answered")
        merged = merge.merge_stats([orjson.loads(body) for _, body in stats])
        # Exact quantiles of all the requests, from the buckets the workers
        # counted them in.
        if len(metrics) == len(stats):
            families = merge.merge_metrics([body.decode("utf-8") for _, body in metrics])
            for name, summary in merge.latency_summaries(families).items():
                merged.setdefault("latency_s", {})[name] = summary
        merged["pid"] = os.getpid()
        merged["started_at"] = self.workers.started_at
        merged["uptime_s"] = time.time() - self.workers.started_at
        answered = {index for index, _ in stats}
        merged["workers"] = [{**row, "up": row["up"] and row["index"] in answered} for row in self.workers.roster()]
        return json_reply(200, merged)

    async def _metrics(self) -> Reply:
        texts = await self._answers("/metrics")
        families = merge.merge_metrics([body.decode("utf-8") for _, body in texts])
        answered = {index for index, _ in texts}
        roster = self.workers.roster()
        own = [
            merge.gauge("hubcore_workers", "Worker processes configured (server.workers).", {"": self.workers.count}),
            merge.gauge("hubcore_workers_answering", "Workers whose numbers this answer sums.", {"": len(texts)}),
            merge.gauge("hubcore_worker_up", "1 while a worker runs and answered this scrape.",
                        {f'worker="{row["index"]}"': 1 if row["up"] and row["index"] in answered else 0
                         for row in roster}),
            merge.counter("hubcore_worker_restarts_total", "Times a worker was started again after it exited.",
                          {f'worker="{row["index"]}"': row["restarts"] for row in roster}),
        ]
        text = merge.render_families([*families.values(), *own])
        return Reply(200, PROMETHEUS_CONTENT_TYPE, text.encode("utf-8"))

    async def _live(self) -> Reply:
        """The live view of every worker that answers, as worker 0's dashboard shows it."""
        answers = dict(await self._answers("/live"))
        if not answers:
            return json_error(503, "no worker answered")
        lives = [orjson.loads(answers[i]) if i in answers else None for i in range(self.workers.count)]
        return json_reply(200, merge.merge_live(lives, merge.LIVE_REQUESTS_SHOWN))

    async def _first(self, target: str) -> Reply:
        """A read only one worker needs to answer (route explain): the first's."""
        listening = self.workers.listening()
        if not listening:
            return json_error(503, "no worker answers")
        status, content_type, body = await ask(listening[0][1], target, timeout=COMMAND_TIMEOUT)
        return Reply(status, content_type or JSON, body)

    # -- commands ------------------------------------------------------------------

    async def _command(self, target: str, path: str) -> Reply:
        listening = self.workers.listening()
        if not listening:
            return json_error(503, "no worker runs")
        answers: list[tuple[int, int, Any]] = []
        if path.startswith("/keys/"):
            # One worker stores the switch and writes its audit row; the
            # others change their rings only (?record=0).
            (index, socket), rest = listening[0], listening[1:]
            answers.append(await self._carry_out(index, socket, target))
            others = f"{target}{'&' if '?' in target else '?'}record=0"
            answers += await asyncio.gather(*(self._carry_out(i, s, others) for i, s in rest))
        else:
            answers += await asyncio.gather(*(self._carry_out(i, s, target) for i, s in listening))
        status, reply = merge.merge_answers(answers)
        running = {index for index, _ in listening}
        reply["workers"] += [
            {"index": row["index"], "status": None, "answer": "not running now: it reads the configuration, tokens and stored key switches "
             "when it starts again"}
            for row in self.workers.roster() if row["index"] not in running
        ]
        return json_reply(status, reply)

    async def _carry_out(self, index: int, socket: str, target: str) -> tuple[int, int, Any]:
        try:
            status, _, body = await ask(socket, target, "POST", timeout=COMMAND_TIMEOUT)
        except OpsClientError as e:
            return index, 504, {"error": str(e)}
        try:
            return index, status, orjson.loads(body)
        except orjson.JSONDecodeError:
            return index, 502, {"error": f"not JSON: {body[:200]!r}"}
