"""The planner: SLA-driven autoscaling of aggregated, prefill and decode worker pools
(docs/planner.md)."""
