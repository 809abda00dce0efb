"""Worker roles: which agents, tasks and services one worker process runs (`--roles` / ROLES).

Evaluation and delivery scale differently (CPU-bound matching vs. waiting on endpoints), so ECS
can run them as separate services of the same image: `alerting-app worker --roles evaluate,aggregate`
and `alerting-app worker --roles deliver`. Every worker serves HTTP (probes, /metrics and the API);
`--roles api` runs nothing else.

Agents, tasks and services register on the app when their modules are imported (all of them,
through the `agents` package). Before the worker starts, those outside the roles are removed: an
agent that is never started never subscribes to its topic, so its partitions go to the workers
that run it. A worker left with no agent starts no Kafka consumer at all (Faust's producer-only
mode), so an API process never joins the consumer group and never causes a rebalance.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import faust

from alerting_app.settings import ROLE_NAMES, roles_of

log = logging.getLogger(__name__)

# The module that defines an agent, task or service decides its role.
MODULE_ROLES: Mapping[str, str] = {
    "agents.evaluate": "evaluate",
    "tables.rules": "evaluate",  # the rule replica: matching needs it, nothing else does
    "tables.silences": "evaluate",  # likewise the silence replica
    "agents.aggregate": "aggregate",
    "agents.close_groups": "aggregate",  # closes the groups the aggregate agent opens, in its table
    "agents.retention": "aggregate",  # deletes what the aggregate stage wrote, once old enough
    "agents.deliver": "deliver",
    "agents.rule_outbox": "relay",
}
# Tables, by name, and the role whose agent writes them.
TABLE_ROLES: Mapping[str, str] = {"notification-groups": "aggregate"}
# Modules whose tasks every worker runs, whatever its roles.
EVERY_ROLE = frozenset({"web.operations"})


class UnassignedComponent(LookupError):
    """An agent, task or service in a module MODULE_ROLES does not know: say which, rather than guess."""


def parse_roles(text: str) -> frozenset[str]:
    """`all` or a comma-separated subset of ROLE_NAMES; ValueError names what is wrong."""
    return frozenset(roles_of(text).split(","))


def role_of(module: str, module_roles: Mapping[str, str] = MODULE_ROLES) -> str | None:
    """The role of what `module` registers; None for what every worker runs."""
    if module in EVERY_ROLE:
        return None
    try:
        return module_roles[module]
    except KeyError:
        raise UnassignedComponent(
            f"{module} registers an agent, task or service but has no role: add it to {__name__}.MODULE_ROLES"
        ) from None


def apply_roles(app: faust.App, roles: frozenset[str], module_roles: Mapping[str, str] = MODULE_ROLES) -> None:
    """Remove what is outside `roles`; call after everything registered, before the worker starts."""
    if roles >= set(ROLE_NAMES):
        return  # everything runs: nothing to look up

    def kept(module: str) -> bool:
        role = role_of(module, module_roles)
        return role is None or role in roles

    for name, agent in list(app.agents.items()):
        if not kept(agent.fun.__module__):
            del app.agents[name]
    # Faust keeps @app.task (and @app.timer) functions and @app.service classes in these lists and
    # starts them once the worker is ready; it has no public way to unregister one.
    app._app_tasks[:] = [task for task in app._app_tasks if kept(task.__module__)]
    app._extra_services[:] = [service for service in app._extra_services if kept(service.__module__)]
    # A table's changelog partitions are assigned with the topics of the workers subscribed to it:
    # held by a worker without its agent, they would not follow that agent's partitions.
    for name, role in TABLE_ROLES.items():
        if role not in roles and name in app.tables:
            table = app.tables.pop(name)
            app.tables._changelogs.pop(table.changelog_topic.get_topic_name(), None)  # no public way either
    if not app.agents:
        app.producer_only = True
    log.info("roles: %s; agents: %s", ",".join(name for name in ROLE_NAMES if name in roles),
             ", ".join(sorted(app.agents)) or "none (no Kafka consumer)")
