"""`enshuffle bench`: measure (`coordinator.bench.measure_all`), then print the figures beside
their targets, or as JSON (`--json`)."""

from __future__ import annotations

import json
import sys

import numpy as np

from enshuffle.commands.options import network_layers
from enshuffle.coordinator.bench import GROWTH_NODES, Figures, build_figures, measure_all


def _format_value(value, unit: str, signed: bool = False, target: bool = False) -> str:
    if value is None:
        return "n/a"
    if unit == "%":
        digits = 1 if abs(value) < 10 and not target else 0
        return f"{value:+.{digits}f}%" if signed or value < 0 else f"{value:.{digits}f}%"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "faults":
        return f"{value / 1000:.1f}k"
    if unit == "MB":
        return f"{value:.0f} MB"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "ns":
        return f"{value:.2f} ns"
    return f"{value:.2f}"


def print_table(figures: Figures, settings: dict) -> None:
    print(
        f"enshuffle bench: {settings['train_images']:,} training images, medians of {settings['repeats']} "
        f"repeats (k = {GROWTH_NODES}: {settings['k7_repeats']}), {settings['seconds']:.0f} s; "
        f"seed preset {settings['seed_network']}, default preset {settings['default_network']}"
    )
    titles = {"targets": "targets", "resident": "the resident design's targets", "other": "other figures"}
    section = None
    for item in figures.items.values():
        if item["section"] != section:
            section = item["section"]
            print(f"\n{titles[section]:<58} {'value':>10}  {'target':<10} status")
        target = (
            ""
            if item["target"] is None
            else f"{item['op']} {_format_value(item['target'], item['unit'], item['signed'], target=True)}"
        )
        status = (
            "" if item["target"] is None else ("n/a" if item["met"] is None else ("ok" if item["met"] else "MISSED"))
        )
        note = f"  ({item['note']})" if item["note"] else ""
        value = _format_value(item["value"], item["unit"], item["signed"])
        line = f"{item['short'] or item['label']:<58} {value:>10}  {target:<10} {status:<6}{note}"
        print(line.rstrip())
    sys.stdout.flush()


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def cmd_bench(args) -> int:
    m, settings = measure_all(
        data=args.data,
        limit=args.limit,
        repeats=args.repeats,
        round_trips=args.round_trips,
        skip_wire=bool(args.skip_wire),
        skip_daemon=bool(args.skip_daemon),
        scaling=bool(getattr(args, "scaling", False)),
        layers=network_layers(args),
        activation=args.activation,
    )
    repeats = args.repeats
    figures = build_figures(m, repeats)
    if args.json:
        hidden = ("section", "signed", "short")
        print(
            json.dumps(
                {
                    "figures": {
                        k: {key: v for key, v in item.items() if key not in hidden} for k, item in figures.items.items()
                    },
                    "measurements": _jsonable(m),
                    "settings": settings,
                },
                indent=2,
            )
        )
    else:
        print_table(figures, settings)
        if m.get("scaling"):
            print(
                "\nresident default preset (784-h-10 and deeper, relu), per step: coordinator CPU against the "
                "cheapest centralized step"
            )
            print(
                f"{'hidden':>10} {'nodes':>5} {'central CPU ms':>15} {'coordinator CPU ms':>19} {'share':>7} "
                f"{'wall ratio':>10} {'privacy cost':>13}"
            )
            for r in m["scaling"]:
                print(
                    f"{r['hidden']:>10} {r['nodes']:>5} {r['central_cpu_ms']:>15.2f} {r['cpu_ms']:>19.2f} "
                    f"{r['cpu_share']:>6.0f}% {r['wall_ratio']:>9.2f}x {r['privacy_cost']:>+12.0f}%"
                )
    return 0
