"""Observers: they read each finished `RequestRecord` and never steer a request.

- `logs`: structlog set-up with the redaction step, and the access-log observer;
- `metrics`: the Prometheus observer (the only prometheus-client user), multiprocess;
- `metrics_server`: `/metrics` behind its token, and the separate metrics listener.
"""
