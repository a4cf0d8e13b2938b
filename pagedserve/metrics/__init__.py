"""Prometheus metrics of the served system (vLLM's names under the `pagedserve:` prefix), the
GPU telemetry of the ranks (NVML), and the structured log line of each finished request."""
