"""Delivery channels, one module each with one async send function: webhook, slack, email.

A send returns when the endpoint accepted the notification, and otherwise raises
`RetryableDeliveryError` (worth trying again later) or `PermanentDeliveryError` (it never will be).
"""
