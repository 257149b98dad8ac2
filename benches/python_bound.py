"""The ceiling for any client that hands every message to Python: the benchmark's own per-message
work, run over lists of the same messages already in memory (no socket, no WebSocket, no
client). A client can only approach these rates on the consuming thread, however fast its
reading is.

    python benches/python_bound.py            # count and cpu, 500,000 and 200,000 messages

- ``count``: each payload (bytes) through the same ``Sink.feed`` the clients' ``count`` uses
  (its seq parsed and checked), taken from lists of 1024 as ``stream.batches(values=True)``
  gives them.
- ``cpu``: the arithmetic of ``wspool-native`` on ``(seq, v, pad)`` tuples, as
  ``wspool.Select("seq", "v", "pad")`` gives them, in the same loop as that client.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

from bench_clients import Sink
from stream_server import message_body

BATCH = 1024


def _batches(items: list, size: int = BATCH) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def count_loop(n: int) -> Callable[[], None]:
    batches = _batches([message_body(seq, 120) for seq in range(n)])

    def run() -> None:
        feed = Sink("count", 120, n, binary=True).feed
        for batch in batches:
            for message in batch:
                feed(message)

    return run


def cpu_loop(n: int) -> Callable[[], None]:
    docs = (json.loads(message_body(seq, 120)) for seq in range(n))
    batches = _batches([(d["seq"], d["v"], d["pad"]) for d in docs])

    def run() -> None:
        expected = 0
        total = 0
        for batch in batches:
            for seq, v, pad in batch:
                if seq != expected:
                    raise AssertionError(f"expected seq {expected}, got {seq}")
                total += seq % 7 * v + len(pad)
                expected += 1
        if expected != n:
            raise AssertionError(f"{expected} of {n}")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    for name, n, make in (("count", 500_000, count_loop), ("cpu", 200_000, cpu_loop)):
        run = make(n)
        rates = []
        for _ in range(args.runs):
            start = time.perf_counter()
            run()
            rates.append(n / (time.perf_counter() - start))
        rates.sort()
        print(
            f"{name}: {n:,} messages, Python's per-message work alone: "
            f"median {rates[len(rates) // 2] / 1e6:.2f}M msgs/s "
            f"(min {rates[0] / 1e6:.2f}M, max {rates[-1] / 1e6:.2f}M, {args.runs} runs)"
        )


if __name__ == "__main__":
    main()
