"""Cloud gateway: the heavy model behind MQTT workers, telemetry store, HTTP API, dashboard."""
