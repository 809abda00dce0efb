"""Faust tables: state kept in local stores and recovered from their changelog topics."""
