"""The cloud daemon: Kinesis consumer, CSR validation, idempotent AWS IoT issuance, delivery.

The entry points others call: :func:`serve` (the whole service, shutdown handed in), its
configuration :class:`CloudConfig` (:func:`load_cloud_config`), and the shard handler with its
delivery follow-up (:class:`ShardHandler`, :class:`DeliveryLoop`, :class:`DeliveryTracker`).
"""

from cloud_daemon.config import CloudConfig, load_cloud_config
from cloud_daemon.handler import (
    CloudMetrics,
    Delivery,
    DeliveryLoop,
    DeliveryTracker,
    ShardHandler,
    transfer_id_for,
)
from cloud_daemon.service import serve

__all__ = [
    "CloudConfig",
    "CloudMetrics",
    "Delivery",
    "DeliveryLoop",
    "DeliveryTracker",
    "ShardHandler",
    "load_cloud_config",
    "serve",
    "transfer_id_for",
]
