"""One topic scheme everywhere: the device policy, the sandbox IoT broker's ACL, the publisher.

A thing may use ``dt/<thing>/...`` (data), ``cmd/<thing>/...`` (commands) and
``$aws/things/<thing>/...`` (AWS's reserved topics). The IoT policy template grants exactly these
in AWS, the sandbox broker's ACL mirrors them, and the ingestion socket confines local programs
to the data prefix, so a message accepted on the gateway is one AWS will accept too.
"""

from __future__ import annotations

import json
from pathlib import Path

from sandbox.brokers import IOT_THING_TOPIC_PATTERNS
from ztp_daemon.ingest import IngestConfig

ROOT = Path(__file__).resolve().parents[2]
THING = "${iot:Connection.Thing.ThingName}"


def _topic_prefixes(kind: str) -> set[str]:
    policy = json.loads((ROOT / "cloud_daemon" / "policy" / "iot-policy.json").read_text())
    prefixes = set()
    for statement in policy["Statement"]:
        resources = statement["Resource"]
        for resource in [resources] if isinstance(resources, str) else resources:
            _, _, name = resource.partition(f":{kind}/")
            if name:
                assert name.endswith(f"{THING}/*"), resource
                prefixes.add(name.removesuffix("/*").replace(THING, "<thing>"))
    return prefixes


def test_policy_topics_and_filters_grant_the_same_prefixes() -> None:
    assert _topic_prefixes("topic") == _topic_prefixes("topicfilter")


def test_sandbox_acl_mirrors_the_device_policy() -> None:
    acl = {
        pattern.removesuffix("/#").replace("%u", "<thing>") for pattern in IOT_THING_TOPIC_PATTERNS
    }
    assert acl == _topic_prefixes("topic")


def test_ingestion_prefix_is_granted_by_the_policy() -> None:
    (prefix,) = IngestConfig.for_thing(Path("/run/ztp.sock"), "SN1").allowed_prefixes
    assert prefix.replace("SN1", "<thing>").removesuffix("/") in _topic_prefixes("topic")
