"""Faust agents, one module per pipeline stage; importing the package registers them on the app."""
from agents import aggregate, close_groups, deliver, evaluate, retention, rule_outbox

__all__ = ["aggregate", "close_groups", "deliver", "evaluate", "retention", "rule_outbox"]
