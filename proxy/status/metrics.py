"""Prometheus metrics of every device, in the text format written by prometheus-client."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from proxy.counters import BUCKETS, POOLED_EXCHANGE, POOLED_LOCK_WAIT, REFUSAL_REASONS, ExchangeResult, Histogram
from proxy.status.snapshot import Entry, is_up

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DeviceCollector:
    """Reads the devices' counters at each scrape; nothing is kept twice.

    Every device has devproxy_device_up. A device with metrics_histograms = true has every series, zeros
    included, and its own wait and exchange histograms. One with metrics_histograms = false (a dial-in
    device, by default) has the series that are not zero, and adds to the pooled histograms: 5,000
    such devices stay under 1 MB (bench/status.py), where every series of each would be 6 MB.
    """

    def __init__(self, entries: Callable[[], list[Entry]]) -> None:
        self._entries = entries

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "devproxy_device_up",
            "1 while the device's link is open, or closed until a client wants it (release_port) after an "
            "open that did not fail",
            labels=["device"],
        )
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
        pooled = False
        for entry in self._entries():
            device, key = entry.device, entry.key
            counters = device.counters
            up.add_metric([key], 1 if is_up(device.state) else 0)
            if device.config.metrics_histograms:
                # Every series, zeros included: a dashboard of a few registers shows a 0, not a gap.
                traffic.add_metric([key, "to_device"], counters.bytes_to_device)
                traffic.add_metric([key, "from_device"], counters.bytes_from_device)
                discarded.add_metric([key], counters.discarded_bytes)
                clients.add_metric([key], device.clients)
                waiting.add_metric([key], device.waiting)
                for result, label in RESULTS:
                    exchanges.add_metric([key, label], counters.exchanges[result])
                for reason, label in REASONS:
                    refused.add_metric([key, label], counters.refused[reason])
                lock_wait.add_metric([key], _buckets(counters.lock_wait_seconds), counters.lock_wait_seconds.total)
                exchange_seconds.add_metric([key], _buckets(counters.exchange_seconds), counters.exchange_seconds.total)
                continue
            # A lean device: its zeros are left out (an absent counter reads as 0 in sums and rates).
            pooled = True
            if counters.bytes_to_device:
                traffic.add_metric([key, "to_device"], counters.bytes_to_device)
            if counters.bytes_from_device:
                traffic.add_metric([key, "from_device"], counters.bytes_from_device)
            if counters.discarded_bytes:
                discarded.add_metric([key], counters.discarded_bytes)
            if device.clients:
                clients.add_metric([key], device.clients)
            if device.waiting:
                waiting.add_metric([key], device.waiting)
            for result, number in counters.exchanges.items():
                if number:
                    exchanges.add_metric([key, str(result)], number)
            for reason, number in counters.refused.items():
                if number:
                    refused.add_metric([key, label_value(reason)], number)
        yield from (up, traffic, exchanges, refused, discarded, clients, waiting, lock_wait, exchange_seconds)
        if pooled:
            yield _pooled("devproxy_pooled_lock_wait_seconds", "How long clients waited", POOLED_LOCK_WAIT)
            yield _pooled("devproxy_pooled_exchange_seconds", "How long exchanges took", POOLED_EXCHANGE)


def _pooled(name: str, what: str, histogram: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        name, f"{what}, on all devices with metrics_histograms = false together (dial-in devices by default)"
    )
    family.add_metric([], _buckets(histogram), histogram.total)
    return family


RESULTS = tuple((result, str(result)) for result in ExchangeResult)


def label_value(reason: str) -> str:
    """A reason as a label value: snake_case ("too many clients" -> "too_many_clients")."""
    return reason.replace(" ", "_")


REASONS = tuple((reason, label_value(reason)) for reason in REFUSAL_REASONS)


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    cumulative = accumulate(histogram.counts)
    return [
        (repr(bound) if bound < math.inf else "+Inf", count) for bound, count in zip(BUCKETS, cumulative, strict=True)
    ]


def exposition(entries: Callable[[], list[Entry]]) -> bytes:
    """The metrics page, as Prometheus scrapes it; devices are labelled by their key (a dial-in id)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DeviceCollector(entries))
    return generate_latest(registry)
