"""Roles select the agents, tasks and services a worker runs; everything the app registers has one."""
from __future__ import annotations

import json
import os
import subprocess

import faust
import pytest
from mode import Service

from alerting_app.roles import UnassignedComponent, apply_roles, parse_roles, role_of
from alerting_app.up import alerting_app_executable


def test_everything_the_app_registers_belongs_to_a_role():
    import agents  # noqa: F401  registers the agents, their tasks and services
    from alerting_app.app import app

    modules = ({agent.fun.__module__ for agent in app.agents.values()}
               | {task.__module__ for task in app._app_tasks}
               | {service.__module__ for service in app._extra_services})

    roles = {module: role_of(module) for module in modules}  # raises for a module without a role

    assert {"evaluate", "aggregate", "deliver", "relay"} <= set(roles.values())


def test_alerting_app_agents_and_tables_describe_everything_they_list():
    # README: `alerting-app agents` / `tables` list them; they said "<N/A>" for every agent and
    # 'Missing description: use Table(.., help="str")' for the table.
    listed = {command: json.loads(subprocess.run([alerting_app_executable(), "--json", command], env=os.environ,
                                                 capture_output=True, text=True, timeout=120, check=True).stdout)
              for command in ("agents", "tables")}

    assert len(listed["agents"]) == 3 and len(listed["tables"]) == 1
    for command, entries in listed.items():
        for entry in entries:
            assert entry["help"] not in ("", "<N/A>") and "Missing description" not in entry["help"], (command, entry)


def _app_with_one_of_each(modules: list[str]) -> faust.App:
    """A fresh app with an agent, a task and a service defined in each of `modules`."""
    # Never started: the broker URL only has to parse.
    app = faust.App(f"roles-{len(modules)}", broker="kafka://localhost:9092", web_enabled=False)
    for n, module in enumerate(modules):
        async def agent(stream):
            async for _ in stream:
                pass

        async def task():
            pass

        for fun, name in ((agent, f"agent_{n}"), (task, f"task_{n}")):
            fun.__module__, fun.__name__, fun.__qualname__ = module, name, name
        app.agent(app.topic(f"topic-{n}"), name=f"{module}.agent_{n}")(agent)
        app.task(task)
        app.service(type(f"Service{n}", (Service,), {"__module__": module}))
    return app


MODULES = ["agents.evaluate", "tables.rules", "agents.aggregate", "agents.close_groups", "agents.retention",
           "agents.deliver", "agents.rule_outbox", "web.operations"]


def _kept(app: faust.App) -> tuple[set, set, set]:
    return ({agent.fun.__module__ for agent in app.agents.values()}, {task.__module__ for task in app._app_tasks},
            {service.__module__ for service in app._extra_services})


def test_a_deliver_worker_keeps_delivery_and_what_every_worker_runs():
    app = _app_with_one_of_each(MODULES)

    apply_roles(app, parse_roles("deliver"))

    agents, tasks, services = _kept(app)
    assert agents == {"agents.deliver", "web.operations"}
    assert tasks == services == {"agents.deliver", "web.operations"}
    assert not app.producer_only


def test_evaluate_keeps_the_rule_replica_and_relay_the_outbox():
    app = _app_with_one_of_each(MODULES)

    apply_roles(app, parse_roles("evaluate,relay"))

    assert _kept(app)[1] == {"agents.evaluate", "tables.rules", "agents.rule_outbox", "web.operations"}


def test_an_aggregate_worker_keeps_the_closer_of_its_groups_and_the_retention_of_its_rows():
    app = _app_with_one_of_each(MODULES)

    apply_roles(app, parse_roles("aggregate"))

    assert _kept(app)[1] == {"agents.aggregate", "agents.close_groups", "agents.retention", "web.operations"}


def test_an_api_worker_runs_no_agent_and_starts_no_consumer():
    app = _app_with_one_of_each(MODULES[:-1])

    apply_roles(app, parse_roles("api"))

    assert _kept(app) == (set(), set(), set())
    assert app.producer_only


def test_a_split_worker_names_a_module_without_a_role():
    app = _app_with_one_of_each(["agents.evaluate", "agents.grouping"])

    with pytest.raises(UnassignedComponent, match="agents.grouping"):
        apply_roles(app, parse_roles("evaluate"))


def test_with_every_role_nothing_is_removed_or_looked_up():
    app = _app_with_one_of_each(["agents.evaluate", "agents.grouping"])

    apply_roles(app, parse_roles("all"))

    assert _kept(app)[0] == {"agents.evaluate", "agents.grouping"}


def test_only_an_aggregate_worker_keeps_the_group_table_and_its_changelog():
    # Its changelog partitions go with the topics of the workers that hold the table: held by a
    # worker without the aggregate agent, they would not follow that agent's partitions.
    held = {}
    for roles in ("deliver", "evaluate,relay,api", "aggregate"):
        app = _app_with_one_of_each(MODULES)
        changelog = app.Table("notification-groups", default=dict, help="groups").changelog_topic.get_topic_name()

        apply_roles(app, parse_roles(roles))

        held[roles] = ("notification-groups" in app.tables, changelog in app.tables._changelogs)
    assert held == {"deliver": (False, False), "evaluate,relay,api": (False, False), "aggregate": (True, True)}
