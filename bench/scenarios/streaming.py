"""Scenario 2: streaming overhead for a 200-event SSE stream.

The asyncio client reads one stream at a time (concurrency 1) through each
hop, every stream a new prompt. Two paces: "paced" (the fake waits 2 ms
between events, like a fast model) and "unpaced" (the fake writes the 200
events back to back, so the time from first to last event is the hop's
per-event cost). Time to first event (TTFE) is from sending the request to
the first complete `data:` event; the inter-event time is (last - first) /
199 per stream; the p99 gap is over every gap of every stream.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench import plots
from bench.common import (
    Context,
    Section,
    Target,
    added_cost,
    added_text,
    median,
    num,
    percentile,
)
from bench.procs import Server
from bench.servers import sidecar_policy
from bench.sse_client import StreamTiming, chat_body, fake_headers, read_stream, session

EVENTS = 200  # role chunk + 197 tokens + finish chunk + [DONE]
TOKENS = EVENTS - 3
PACES = {"paced 2 ms": 0.002, "unpaced": 0.0}


@dataclass
class Cell:
    timings: list[StreamTiming]

    @property
    def ok(self) -> list[StreamTiming]:
        return [t for t in self.timings if t.ok and t.events == EVENTS]

    def ttfe(self, q: float = 50) -> float:
        return percentile(self.ttfes, q)

    @property
    def ttfes(self) -> list[float]:
        return [t.ttfe for t in self.ok]

    @property
    def per_event(self) -> float:
        return median(self.per_events)

    @property
    def per_events(self) -> list[float]:
        return [(t.last_at - t.first_at) / (t.events - 1) for t in self.ok]

    @property
    def total(self) -> float:
        """Request sent to last event, median over streams."""
        return median(self.totals)

    @property
    def totals(self) -> list[float]:
        return [t.last_at - t.sent for t in self.ok]

    @property
    def gap_p99(self) -> float:
        gaps = [b - a for t in self.ok for a, b in zip(t.arrivals, t.arrivals[1:], strict=False)]
        return percentile(gaps, 99)

    @property
    def failed(self) -> int:
        return len(self.timings) - len(self.ok)


async def run(ctx: Context) -> Section:
    streams = ctx.pick(15, 3)
    section = Section(
        key="streaming",
        title="2. Streaming overhead (200-event stream, one reader at a time)",
        method=__doc__.split("\n\n", 1)[1].replace("\n", " ").strip()
        + f" {streams} streams per hop and pace, rounds interleaved; medians shown.",
        columns=[
            "pace",
            "hop",
            "TTFE p50 ms",
            "added TTFE ms",
            "inter-event ms",
            "added per event µs",
            "gap p99 ms",
            "added total ms",
            "failed",
        ],
    )
    cells: dict[tuple[str, str], Cell] = {}
    async with ctx.lab() as lab:
        fake = await lab.fake()
        hops: dict[str, Server] = {
            "direct": fake,
            "nginx": await lab.nginx(fake),
            "bare relay": await lab.bare_relay(fake),
            "llm-sidecar": await lab.sidecar(sidecar_policy(fake.port)),
        }
        async with session() as client:
            for name, server in hops.items():  # one throwaway stream each: pools, imports
                await read_stream(
                    client,
                    f"{server.url}/v1/chat/completions",
                    chat_body(f"warm {ctx.nonce} {name}", stream=True),
                    fake_headers(TOKENS),
                )
            for index in range(streams):
                for pace, delay in PACES.items():
                    for name, server in hops.items():
                        timing = await read_stream(
                            client,
                            f"{server.url}/v1/chat/completions",
                            chat_body(f"stream {ctx.nonce} {name} {pace} {index}", stream=True),
                            fake_headers(TOKENS, delay),
                            keep_arrivals=True,
                        )
                        cells.setdefault((pace, name), Cell([])).timings.append(timing)
    for pace in PACES:
        direct = cells[(pace, "direct")]
        for name in hops:
            cell = cells[(pace, name)]
            section.rows.append(
                [
                    pace,
                    name,
                    num(cell.ttfe() * 1000, 3),
                    "—" if name == "direct" else added_text(*_added(cell, direct, "ttfe"), 3, 1e3),
                    num(cell.per_event * 1000, 4),
                    "—" if name == "direct" else added_text(*_added(cell, direct, "event"), 1, 1e6),
                    num(cell.gap_p99 * 1000, 3),
                    "—" if name == "direct" else added_text(*_added(cell, direct, "total"), 3, 1e3),
                    str(cell.failed),
                ]
            )
            section.raw[f"{pace}/{name}"] = {
                "ttfe_p50": cell.ttfe(),
                "per_event": cell.per_event,
                "gap_p99": cell.gap_p99,
                "errors": sorted({t.error for t in cell.timings if t.error}),
            }
            errors = sorted({f"{t.status} {t.error}".strip() for t in cell.timings if not t.ok})
            if errors:
                section.notes.append(f"{pace}, {name}: failures: {'; '.join(errors)[:300]}")
    unpaced = "unpaced"

    def added(pace: str, name: str, what: str) -> float:
        diff, _ = _added(cells[(pace, name)], cells[(pace, "direct")], what)
        return diff * (1e3 if what == "ttfe" else 1e6)

    def shown(name: str, what: str) -> str:
        diff, noise = _added(cells[(unpaced, name)], cells[(unpaced, "direct")], what)
        text = added_text(diff, noise, *((3, 1e3) if what == "ttfe" else (1, 1e6)))
        return text if text in ("n/a", "within noise") else f"{text} {_UNIT[what]}"

    side_total = (cells[(unpaced, "llm-sidecar")].total - cells[(unpaced, "direct")].total) * 1e3
    bare_total = (cells[(unpaced, "bare relay")].total - cells[(unpaced, "direct")].total) * 1e3
    total_ratio = side_total / bare_total if bare_total > 0 else float("nan")
    section.targets.append(
        Target(
            "2",
            "llm-sidecar added total time of a 200-event stream (unpaced) ≤ 1.5x the bare relay's",
            f"{side_total:.3f} ms vs {bare_total:.3f} ms = {total_ratio:.2f}x",
            None if total_ratio != total_ratio else total_ratio <= 1.5,
        )
    )
    section.headline.append(
        "Streaming (200 events, c=1, unpaced): added TTFE "
        f"bare relay {shown('bare relay', 'ttfe')}, llm-sidecar {shown('llm-sidecar', 'ttfe')}; "
        f"added cost per event bare relay {shown('bare relay', 'event')}, "
        f"llm-sidecar {shown('llm-sidecar', 'event')}."
    )
    section.notes.append(
        "Paced TTFE includes waking idle processes: between paced events every process on "
        "the path sleeps, and on this VM each hop that has to wake adds roughly 0.4-0.5 ms "
        "(nginx too); the unpaced rows show the processing cost without that."
    )
    names = [n for n in hops if n != "direct"]
    section.plots.append(
        plots.bars(
            ctx.out_dir / "streaming_overhead.png",
            "Scenario 2: added time to first event (ms) and per event (µs), unpaced",
            names,
            {
                "added TTFE, ms": [added(unpaced, n, "ttfe") for n in names],
                "added per event, µs": [added(unpaced, n, "event") for n in names],
            },
            "ms / µs over direct",
        )
    )
    return section


_UNIT = {"ttfe": "ms", "event": "µs"}


def _added(cell: Cell, direct: Cell, what: str) -> tuple[float, float]:
    """The hop's added TTFE, per-event or total time (seconds) and its noise."""
    if what == "ttfe":
        return added_cost(cell.ttfes, direct.ttfes)
    if what == "total":
        return added_cost(cell.totals, direct.totals)
    return added_cost(cell.per_events, direct.per_events)
