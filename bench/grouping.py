"""The aggregate stage under an alert storm whose clients group their alerts (Alertmanager's case).

    .venv/bin/python bench/grouping.py [--clients 20] [--alerts 20000] [--window-s 60] [--silenced]
        [--repeat-interval-s N [--muting]]

Seeds `--clients` clients with one rule each (alerting_app.seed), gives every rule a grouping window
of `--window-s` seconds, starts one worker with ROLES=aggregate only, and puts a storm of `--alerts`
matches of those rules on alerts.matched, as fast as the producer goes, spread evenly over the
clients: each client's group collects alerts/clients members (1,000 by default), far past
GROUP_MAX_ALERTS, so most members are unlisted ones (their alerts kept in Postgres,
notification_alerts.unlisted_alert). The evaluator is not run: the matches are produced as it would
send them (keyed by client_id, naming the group rule and window), so the figures are the aggregate
stage's alone.

It prints:
- members recorded per second (notification_alerts rows, sampled every 0.5 s, between 10% and 90%
  of the storm: start-up and tail left out) and over the whole storm;
- the worker's CPU per member while the storm is recorded, and each process's CPU (Postgres, broker,
  Redis, the worker, this process, which produces the storm and samples; Postgres's is that of its
  processes alive at each sample, so a short-lived backend such as autovacuum's is missed);
- once every window has passed: the groups, the notifications emitted for them (rows with
  group_rule_id, and messages on notifications.ready: one per group is right), what they list and
  count, the size of notification_alerts, and the CPU the closes took (from about 1 s before the
  first window ended).

It runs against a release before the unlisted members were kept (no unlisted_alert column) too,
to compare (docs/performance.md, Grouping under a storm).

With `--silenced`, every client also has a silence in force that matches none of the storm's
alerts: the closer then checks every member, listed and unlisted, against it (docs/grouping.md).
The window must outlast recording the storm, or a client's later members open a second group
(the figures say so).

With `--repeat-interval-s N`, every rule also has that repeat interval, with the fingerprint keyed
on the context's `host` (`fingerprint_keys = {host}`), and the matches carry the interval and the
fingerprint as the evaluator sets them (contracts.fingerprint_of): each client's alerts have hosts
of their own, except that 1 in 10 repeats the host of that client's alert 5 before it, so 1 in 10
of the storm is a repeat the aggregate stage suppresses (a SUPPRESSED notification, not a member;
"recorded" then counts both). With `--muting` as well, every client has a silence on
`team=muted` starting half a window after the bench starts (as if made while the groups are
open), and the alerts that are repeated later carry that team: the closer mutes them (1 in 9
members), and as the suppressed repeats would be lost with them, decides those repeats again
(tables/group_records.py revive_repeats), notifying them in the closing groups.
"""
from __future__ import annotations

import argparse
import asyncio
import time

import asyncpg
import psutil

from deliveries import cpu_seconds, service_processes
from figures import TooFewToMeasure, steady_rate
from offsets import end_offsets
from stack import BenchStack, machine_summary, produce_keyed

from alerting_app.contracts import WILDCARD, Alert, AlertMatched, fingerprint_of

# A context of a typical size (a few hundred bytes as encoded): unlisted members store it.
CONTEXT = {"host": "node-0000.example.internal", "region": "eu-west-1", "team": "payments",
           "runbook": "https://runbooks.example.internal/storm", "summary": "disk usage above 90% " * 4}

# --repeat-interval-s: the one context key of every rule's fingerprint, and which of a client's alerts
# (its position among them, modulo REPEAT_EVERY) repeats the fingerprint of the one REPEAT_BACK before
# it (whose team is MUTED_TEAM with --muting).
FINGERPRINT_KEYS = ["host"]
REPEAT_EVERY, REPEAT_AT, REPEAT_BACK = 10, 9, 5
MUTED_TEAM = "muted"


async def storm_rules(stack: BenchStack, clients: int, window_s: int, silenced: bool, repeat_interval_s: int,
                      muting: bool) -> list[dict]:
    """Seed one rule per client, give each the window (and --repeat-interval-s, keyed on the host),
    (--silenced) a silence matching nothing, and (--muting) a silence on MUTED_TEAM from half a
    window on."""
    from alerting_app.seed import seed

    pool = await stack.pool()
    try:
        await seed(pool, clients=clients, rules_per_client=1)
        async with pool.acquire() as conn:
            rules = [dict(row) for row in await conn.fetch(
                "UPDATE rules SET group_window_s = $1, repeat_interval_s = $2,"
                " fingerprint_keys = CASE WHEN $2 > 0 THEN $3::text[] ELSE '{}' END"
                " RETURNING rule_id::text, client_id::text, severity, source, name", window_s, repeat_interval_s,
                FINGERPRINT_KEYS)]
            if silenced:
                await conn.execute(
                    "INSERT INTO silences (silence_id, client_id, severity, source, name, starts_at, ends_at,"
                    " comment, created_by)"
                    " SELECT gen_random_uuid(), client_id, '*', 'no-such-source', '*', now() - interval '1 minute',"
                    " now() + interval '1 day', 'bench: matches none of the storm', 'bench' FROM clients")
            if muting:
                await conn.execute(
                    "INSERT INTO silences (silence_id, client_id, severity, source, name, context_matchers,"
                    " starts_at, ends_at, comment, created_by)"
                    " SELECT gen_random_uuid(), client_id, '*', '*', '*', jsonb_build_object('team', $1::text),"
                    " now() + make_interval(secs => $2), now() + interval '1 day',"
                    " 'bench: mutes the repeated alerts at close', 'bench' FROM clients", MUTED_TEAM, window_s / 2)
        return rules
    finally:
        await pool.close()


def storm(rules: list[dict], count: int, window_s: int, repeat_interval_s: int = 0,
          muting: bool = False) -> list[AlertMatched]:
    """`count` matches, client after client in turn, each of an alert its client's rule matches
    (--repeat-interval-s: 1 in 10 of a client's a repeat, see FINGERPRINT_KEYS)."""
    matches = []
    for n in range(count):
        rule = rules[n % len(rules)]
        context = {**CONTEXT, "seq": str(n)}
        if repeat_interval_s:
            nth = n // len(rules)  # among its client's alerts
            of = nth - REPEAT_BACK if nth % REPEAT_EVERY == REPEAT_AT else nth
            context["host"] = f"node-{n % len(rules):04d}-{of:06d}.example.internal"
            if muting and nth % REPEAT_EVERY == REPEAT_AT - REPEAT_BACK:
                context["team"] = MUTED_TEAM
        alert = Alert(alert_id=f"storm-{n}", event_ts=time.time(),
                      severity="CRITICAL" if rule["severity"] == WILDCARD else rule["severity"],
                      source=rule["source"], name="disk-full" if rule["name"] == WILDCARD else rule["name"],
                      context=context)
        matches.append(AlertMatched(
            alert=alert, client_id=rule["client_id"], rule_ids=[rule["rule_id"]], group_rule_id=rule["rule_id"],
            group_window_s=window_s, repeat_interval_s=repeat_interval_s,
            fingerprint=fingerprint_of(rule["client_id"], alert, FINGERPRINT_KEYS) if repeat_interval_s else None))
    return matches


async def produce(bootstrap: str, matches: list[AlertMatched]) -> float:
    return await produce_keyed(bootstrap, "alerts.matched", ((m.client_id.encode(), m.encode()) for m in matches))


async def members_recorded(conn: asyncpg.Connection) -> int:
    """Group members, and the repeats suppressed (--repeat-interval-s) rather than made members."""
    return await conn.fetchval("SELECT (SELECT count(*) FROM notification_alerts)"
                               " + (SELECT count(*) FROM notifications WHERE status = 'SUPPRESSED')")


async def group_figures(conn: asyncpg.Connection, keeps_unlisted: bool) -> asyncpg.Record:
    kept = ("(SELECT count(*) FROM notification_alerts WHERE unlisted_alert IS NOT NULL)" if keeps_unlisted
            else "NULL")
    return await conn.fetchrow(
        "SELECT (SELECT count(DISTINCT notification_id) FROM notification_alerts) AS groups,"
        f" {kept} AS kept_unlisted,"
        " count(*) AS notifications, count(*) FILTER (WHERE emitted) AS emitted,"
        " count(*) FILTER (WHERE status = 'SILENCED') AS silenced,"
        " (SELECT count(*) FROM notifications WHERE status = 'SUPPRESSED') AS suppressed,"
        " coalesce(sum(jsonb_array_length(alerts)), 0) AS listed, coalesce(sum(truncated_alerts), 0) AS truncated,"
        " pg_total_relation_size('notification_alerts') AS members_bytes"
        " FROM notifications WHERE group_rule_id IS NOT NULL AND status <> 'SUPPRESSED'")


async def has_unlisted_column(conn: asyncpg.Connection) -> bool:
    """False on a release before migrations/010_unlisted_members.sql (for comparing with one)."""
    return await conn.fetchval("SELECT EXISTS (SELECT FROM information_schema.columns"
                               " WHERE table_name = 'notification_alerts' AND column_name = 'unlisted_alert')")


def cpu_by_process(processes: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """cpu_seconds, and this process's own: its children are the services and the worker, counted
    apart already."""
    return {**cpu_seconds(processes), "bench process": time.process_time()}


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


def print_cpu(used: dict[str, float], machine_busy: float) -> None:
    total = sum(used.values())
    print(f"  CPU seconds: {machine_busy:.1f} busy on the machine (all processes), of which")
    for name in sorted(used, key=used.get, reverse=True):
        print(f"    {name:14s} {used[name]:7.2f}  ({100 * used[name] / total if total else 0:.0f}% of these)")


def machine_busy_since(before) -> float:
    after = psutil.cpu_times()
    return sum(after) - sum(before) - (after.idle - before.idle)


async def run(stack: BenchStack, args: argparse.Namespace) -> None:
    rules = await storm_rules(stack, args.clients, args.window_s, args.silenced, args.repeat_interval_s,
                              args.muting)
    print(f"seeded {len(rules)} clients, one rule each with group_window_s={args.window_s}"
          + (f", repeat_interval_s={args.repeat_interval_s} keyed on {FINGERPRINT_KEYS} (1 in {REPEAT_EVERY}"
             f" of the storm a repeat)" if args.repeat_interval_s else "")
          + (", each with a silence in force matching none of the storm" if args.silenced else "")
          + (f", each with a silence on team={MUTED_TEAM} from half a window on (1 in {REPEAT_EVERY - 1} members)"
             if args.muting else ""))
    matches = storm(rules, args.alerts, args.window_s, args.repeat_interval_s, args.muting)
    worker = stack.start_worker("aggregate", roles="aggregate")
    processes = service_processes(stack, [worker], receiver_pid=None)
    conn = await asyncpg.connect(stack.database_url)
    try:
        keeps_unlisted = await has_unlisted_column(conn)
        ready_before = await end_offsets(stack.bootstrap, "notifications.ready")
        cpu_before, machine_before = cpu_by_process(processes), psutil.cpu_times()
        started = time.monotonic()
        produced_s = await produce(stack.bootstrap, matches)
        print(f"storm: {args.alerts:,} matches for {args.clients} clients put on alerts.matched in {produced_s:.1f}s"
              f" (worker ROLES=aggregate, GROUP_MAX_ALERTS default 100: "
              f"{args.alerts // args.clients:,} members a group)")
        samples: list[tuple[float, int]] = []
        while True:
            recorded = await members_recorded(conn)
            now = time.monotonic() - started
            samples.append((now, recorded))
            if recorded >= args.alerts:
                break
            if now > args.timeout_s:
                raise SystemExit(f"stalled: {recorded:,} of {args.alerts:,} members recorded after {now:.0f}s; "
                                 f"worker log {worker.log_path}")
            await asyncio.sleep(0.5)
        recorded_s = samples[-1][0]
        cpu_recorded, busy_recorded = cpu_by_process(processes), machine_busy_since(machine_before)
        try:
            steady = f"{steady_rate(samples, args.alerts // 10, args.alerts * 9 // 10):,.0f}/s steady (10%-90%)"
        except TooFewToMeasure as exc:
            steady = f"no steady rate ({exc})"
        used = cpu_used(cpu_before, cpu_recorded)
        print(f"\nrecording the storm: members recorded {steady}, {args.alerts / recorded_s:,.0f}/s over the "
              f"whole storm ({recorded_s:.1f}s from the first produced)")
        print(f"  worker CPU per member: {1000 * used['worker'] / args.alerts:.3f} ms; Postgres CPU per member: "
              f"{1000 * used.get('postgres', 0.0) / args.alerts:.3f} ms")
        print_cpu(used, busy_recorded)
        if recorded_s > args.window_s:
            print(f"  (the storm took longer than the {args.window_s}s window: clients' later members open "
                  f"further groups)")

        # The closes' own CPU: from about 1 s before the first window ends (the wait before it is the
        # closer's idle rounds) until every group is closed, within GROUP_CLOSE_INTERVAL_S of its window.
        # No group opened before the last sample that found no member.
        none_yet = max((at for at, count in samples if count == 0), default=0.0)
        await asyncio.sleep(max(0.0, started + none_yet + args.window_s - 1 - time.monotonic()))
        cpu_closing, closing_from = cpu_by_process(processes), time.monotonic()
        while True:
            figures = await group_figures(conn, keeps_unlisted)
            if figures["groups"] and figures["emitted"] + figures["silenced"] >= figures["groups"]:
                break
            if time.monotonic() - started > args.timeout_s + args.window_s:
                raise SystemExit(f"groups not all closed: {dict(figures)}; worker log {worker.log_path}")
            await asyncio.sleep(0.5)
        closed_s = time.monotonic() - started
        cpu_closed = cpu_by_process(processes)
        ready = await end_offsets(stack.bootstrap, "notifications.ready") - ready_before
        print(f"\nclosing the groups (all closed {closed_s - recorded_s:.1f}s after the storm was recorded):")
        print(f"  groups {figures['groups']}, notifications {figures['notifications']} (emitted "
              f"{figures['emitted']}, silenced {figures['silenced']}), repeats still suppressed "
              f"{figures['suppressed']:,}, messages on notifications.ready {ready}"
              + ("" if ready == figures["groups"] else "  <-- not one per group"))
        kept = f"{figures['kept_unlisted']:,}" if keeps_unlisted else "none (no unlisted_alert column)"
        print(f"  members listed {figures['listed']:,}, counted in truncated_alerts {figures['truncated']:,} "
              f"(of {args.alerts:,}); unlisted members' alerts kept in Postgres: {kept}; notification_alerts "
              f"{figures['members_bytes'] / 2**20:.1f} MiB with its indexes")
        waiting, closing = cpu_used(cpu_recorded, cpu_closing), cpu_used(cpu_closing, cpu_closed)
        print(f"  CPU seconds closing (from about 1 s before the first window ended to the last close, "
              f"{closed_s - (closing_from - started):.1f}s): worker {closing['worker']:.2f}, "
              f"postgres {closing.get('postgres', 0.0):.2f}; waiting for the windows before that: "
              f"worker {waiting['worker']:.1f}, postgres {waiting.get('postgres', 0.0):.1f}")
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--alerts", type=int, default=20_000, help="matches in the storm")
    parser.add_argument("--window-s", type=int, default=60, help="every rule's group_window_s")
    parser.add_argument("--silenced", action="store_true",
                        help="give every client a silence in force that matches none of the storm")
    parser.add_argument("--repeat-interval-s", type=int, default=0,
                        help="every rule's repeat_interval_s, keyed on the host; 1 in 10 of the storm a repeat")
    parser.add_argument("--muting", action="store_true",
                        help="with --repeat-interval-s: a silence from half a window on mutes the repeated "
                             "members at close, whose repeats the closer decides again")
    parser.add_argument("--timeout-s", type=float, default=600, help="give up recording the storm after this")
    args = parser.parse_args()
    if min(args.clients, args.alerts, args.window_s) < 1:
        parser.error("--clients, --alerts and --window-s must be at least 1")
    if args.clients > args.alerts:
        parser.error("--clients exceeds --alerts: some client would have no member")
    if args.muting and not args.repeat_interval_s:
        parser.error("--muting needs --repeat-interval-s")
    print(f"machine: {machine_summary()}")
    with BenchStack("grouping") as stack:
        asyncio.run(run(stack, args))


if __name__ == "__main__":
    main()
