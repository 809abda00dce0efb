"""Faust agents, one module per pipeline stage; importing the package registers them on the app."""
from agents import aggregate, deliver, evaluate, rule_outbox

__all__ = ["aggregate", "deliver", "evaluate", "rule_outbox"]
