"""Prometheus metrics of every device, in the text format written by prometheus-client."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from proxy.counters import BUCKETS, ExchangeResult, Histogram
from proxy.device import UP_STATES, Device

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DeviceCollector:
    """Reads the devices' counters at each scrape; nothing is kept twice."""

    def __init__(self, devices: Callable[[], list[Device]]) -> None:
        self._devices = devices

    def collect(self) -> Iterator[Metric]:
        devices = self._devices()
        up = GaugeMetricFamily("devproxy_device_up", "1 while the device's link is open", labels=["device"])
        traffic = CounterMetricFamily(
            "devproxy_device_bytes", "Bytes to and from the device", labels=["device", "direction"]
        )
        exchanges = CounterMetricFamily(
            "devproxy_exchanges", "Exchanges by result (exchange sharing)", labels=["device", "result"]
        )
        refused = CounterMetricFamily("devproxy_refused", "Clients refused, by reason", labels=["device", "reason"])
        discarded = CounterMetricFamily(
            "devproxy_discarded_bytes",
            "Bytes of answers dropped while the device settled (their client had left, or they came too late)",
            labels=["device"],
        )
        clients = GaugeMetricFamily("devproxy_clients", "Connected clients", labels=["device"])
        waiting = GaugeMetricFamily("devproxy_waiting_clients", "Clients waiting for the device", labels=["device"])
        lock_wait = HistogramMetricFamily(
            "devproxy_lock_wait_seconds", "How long clients waited for the device", labels=["device"]
        )
        exchange_seconds = HistogramMetricFamily(
            "devproxy_exchange_seconds", "How long exchanges took (exchange sharing)", labels=["device"]
        )
        for device in devices:
            name, counters = device.name, device.counters
            up.add_metric([name], 1 if device.state in UP_STATES else 0)
            traffic.add_metric([name, "to_device"], counters.bytes_to_device)
            traffic.add_metric([name, "from_device"], counters.bytes_from_device)
            for result in ExchangeResult:
                exchanges.add_metric([name, str(result)], counters.exchanges[result])
            for reason in ("busy", "offline", "too many clients", "not allowed"):
                refused.add_metric([name, reason], counters.refused.get(reason, 0))
            discarded.add_metric([name], counters.discarded_bytes)
            clients.add_metric([name], device.clients)
            waiting.add_metric([name], device.waiting)
            lock_wait.add_metric([name], _buckets(counters.lock_wait_seconds), counters.lock_wait_seconds.total)
            exchange_seconds.add_metric([name], _buckets(counters.exchange_seconds), counters.exchange_seconds.total)
        yield from (up, traffic, exchanges, refused, discarded, clients, waiting, lock_wait, exchange_seconds)


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    cumulative = accumulate(histogram.counts)
    return [
        (repr(bound) if bound < math.inf else "+Inf", count) for bound, count in zip(BUCKETS, cumulative, strict=True)
    ]


def exposition(devices: Callable[[], list[Device]]) -> bytes:
    """The metrics page, as Prometheus scrapes it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DeviceCollector(devices))
    return generate_latest(registry)
