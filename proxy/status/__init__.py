"""The status server: an HTML page, a JSON API and Prometheus metrics about every device."""
