"""The engine process's messages, pickled: torch's own pickling against the server's
(``server.engine.protocol.dumps``, tensors as numpy arrays), side by side in one run.

    python bench/wire.py

Two messages: one ``/v1/choices`` answer (K = 10 samples x 4 choices, as the engine sends it)
and one decode step's events for 64 streams. Prints the median dumps + loads round trip of each.
"""

from __future__ import annotations

import pickle
import platform
import statistics
import timeit

import torch

from server.engine.protocol import ChoiceOutput, EngineOutputs, EngineStats, Finished, TokenDelta, dumps
from tfb_core import TokenInfo
from tfb_core.uncertainty import decompose


def messages() -> dict[str, list]:
    probs = torch.softmax(torch.randn(40, 4), -1).split(10)[1]  # one item's rows of a batch of 4
    u = decompose(probs[None].double(), 1.0)
    answer = [EngineOutputs([Finished(7, ChoiceOutput(probs, u.probs[0], 0.1, 0.2, 0.3))], EngineStats())]
    events = [EngineOutputs([TokenDelta(i, TokenInfo(1234, -0.5, 0.7, 0.6, 0.1, []), " word") for i in range(64)],
                            EngineStats())]
    return {"a /v1/choices answer (K = 10, 4 choices)": answer, "one step's events, 64 streams": events}


def round_trip_us(dump, message, number: int = 500) -> float:
    runs = timeit.repeat(lambda: pickle.loads(dump(message)), number=number, repeat=7)
    return statistics.median(runs) / number * 1e6


def main() -> None:
    torch_pickle = lambda m: pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL)  # noqa: E731
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| message | torch's pickling: us, bytes | the server's: us, bytes |")
    print("|---|---|---|")
    for name, message in messages().items():
        cells = [f"{round_trip_us(f, message):.0f}, {len(f(message))}" for f in (torch_pickle, dumps)]
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
