"""False DEADs of 20 full node cores joining at once under random loss (fake clock).

What ``tests/integration/test_gossip.py`` does with 20 real agents, sans I/O: one
``init``, then every other node joins through the leader (or a ``--fanout``-ary tree
of seeds) at the same instant, all under ``--loss`` random loss of every datagram
(joins, SWIM, record pulls, control requests), for ``--duration`` simulated seconds
with the ``lan`` timers and push-pull every 5 s. Nobody crashes, so every DEAD is
false. Real ``Node`` cores (records, signatures, ``learn_unknown=False``), delivered
at once by the in-memory network of ``tests/unit/corenet.py``; one seed per run, so a
run is reproducible. Prints per run and in total: the runs with a false DEAD, the
suspicion timers that ran out (each declares one), the DEAD events at all observers
(a declaration spreads), and when the last node had all records.

    .venv/bin/python -m benchmarks.false_dead --runs 100 --seed 101
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from typing import Any

from benchmarks.common import machine_info, timestamp, write_json
from meshd.core import membership
from meshd.core.admission import mint_token
from meshd.core.join import JoinFailed
from meshd.core.membership import MemberState, MemberStateChanged
from meshd.core.node import Node
from tests.unit.corenet import Net, Rand

TIMING = dataclasses.replace(membership.PROFILES["lan"], push_pull_interval=5.0)
MAX_STEPS = 5_000_000


def run(seed: int, n: int, loss: float, duration: float, fanout: int) -> dict[str, Any]:
    """One cluster's life; counts every DEAD and who declared it (a suspicion timer)."""
    membership.PROFILES["lan"] = TIMING  # the nodes' default timing (restored by the caller)
    rng = random.Random(seed)
    net = Net(rand=Rand(seed))
    net.drop_fn = lambda data, src, dst: rng.random() < loss
    addr = [(f"10.0.{i // 250}.{i % 250 + 1}", 7946) for i in range(n)]
    leader = net.init("n0", addr[0])
    token, _ = mint_token(
        leader.token_key, leader.sign.node_id, leader.ca_public, net.rand(8), net.now, 600, 0
    )
    t0, joining, failed = net.now, {}, 0
    for i in range(1, n):
        seed_addr = addr[(i - 1) // fanout] if fanout < n else addr[0]
        joining[addr[i]] = (i, *net.join_client(addr[i], token, [seed_addr], f"n{i}", 60))
    timers_fired: list[float] = []
    fire = membership.Membership._fire

    def counting_fire(self: membership.Membership, entry: Any, now: float) -> None:
        if entry[2] == membership._T_SUSPECT:
            timers_fired.append(now - t0)
        fire(self, entry, now)

    membership.Membership._fire = counting_fire  # type: ignore[method-assign]
    dead_events, records_at = 0, None
    try:
        for _ in range(MAX_STEPS):
            net.fire_timers()
            net.settle()
            for a, (i, client, sign, wg) in list(joining.items()):
                ev = client.next_event()
                if ev is None:
                    continue
                del joining[a], net.clients[a]
                if isinstance(ev, JoinFailed):
                    failed += 1
                    continue
                member = Node.from_grant(
                    ev.grant, sign=sign, wg=wg, config=net.config(f"n{i}", a), now=net.now,
                    random_bytes=net.rand,
                )  # fmt: skip
                net.add(a, member)
            for evs in net.events.values():
                dead_events += sum(
                    isinstance(e, MemberStateChanged) and e.new is MemberState.DEAD for e in evs
                )
                evs.clear()
            if (
                records_at is None
                and not joining
                and all(len(x.store) == len(net.nodes) for x in net.nodes.values())
            ):
                records_at = net.now - t0
            t = net.next_timer()
            if t is None or net.now >= t0 + duration:
                break
            net.now = max(net.now, min(t, t0 + duration))
    finally:
        membership.Membership._fire = fire  # type: ignore[method-assign]
    return {
        "seed": seed,
        "joined": len(net.nodes),
        "join_failed": failed,
        "timers_fired": [round(t, 1) for t in timers_fired],
        "dead_events": dead_events,
        "all_records_s": None if records_at is None else round(records_at, 1),
        "refutations": sum(x.swim.incarnation for x in net.nodes.values()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--seed", type=int, default=1, help="first seed (one per run)")
    p.add_argument("--nodes", type=int, default=20)
    p.add_argument("--loss", type=float, default=0.2)
    p.add_argument("--duration", type=float, default=90.0)
    p.add_argument(
        "--fanout", type=int, default=1_000, help="join tree fan-out (default: all via the leader)"
    )
    args = p.parse_args(argv)
    saved = membership.PROFILES["lan"]
    runs, start = [], time.monotonic()
    try:
        for seed in range(args.seed, args.seed + args.runs):
            r = run(seed, args.nodes, args.loss, args.duration, args.fanout)
            runs.append(r)
            print(
                f"seed {seed}: {r['joined']} joined ({r['join_failed']} failed), false DEADs "
                f"declared {len(r['timers_fired'])} at {r['timers_fired']} s, DEAD events "
                f"{r['dead_events']}, refutations {r['refutations']}, all records after "
                f"{r['all_records_s']} s",
                flush=True,
            )
    finally:
        membership.PROFILES["lan"] = saved
    with_dead = sum(bool(r["timers_fired"]) for r in runs)
    declared = sum(len(r["timers_fired"]) for r in runs)
    print(
        f"{len(runs)} runs of {args.nodes} nodes, {args.loss:.0%} loss, {args.duration:.0f} s: "
        f"{with_dead} with a false DEAD, {declared} declared, "
        f"{sum(r['dead_events'] for r in runs)} DEAD events, "
        f"{sum(r['join_failed'] for r in runs)} failed joins ({time.monotonic() - start:.0f} s)"
    )
    write_json(
        "false_dead",
        {"when": timestamp(), "machine": machine_info(), "args": vars(args), "runs": runs},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
