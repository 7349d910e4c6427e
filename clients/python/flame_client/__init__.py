"""Python client for flame-live: subscribe to the ZeroMQ stream and get validated FLAME parameters.

    from flame_client import Subscriber
    with Subscriber("tcp://127.0.0.1:5555") as subscriber:
        for topic, message in subscriber:
            if topic == "flame.frame" and message["valid"]:
                print(message["seq"], message["exp"][:3])

The wire schema (``flame_client.messages``) is shared with the publisher, so both sides validate the same way.
"""

from flame_client.messages import (
    BLENDSHAPE_NAMES,
    DEFAULT_ZMQ_ADDRESS,
    SCHEMA_VERSION,
    TOPIC_FRAME,
    TOPIC_METRICS,
    TOPIC_SHAPE,
    TOPICS,
    MessageError,
    decode,
    validate,
)

__all__ = [
    "BLENDSHAPE_NAMES",
    "DEFAULT_ZMQ_ADDRESS",
    "SCHEMA_VERSION",
    "TOPICS",
    "TOPIC_FRAME",
    "TOPIC_METRICS",
    "TOPIC_SHAPE",
    "MessageError",
    "Subscriber",
    "SubscriberError",
    "decode",
    "validate",
]


def __getattr__(name: str) -> object:
    """``Subscriber`` and ``SubscriberError`` load ZeroMQ on first use: processes that only need the schema
    (``flame_client.messages``, such as the tracker's MediaPipe worker) never load it."""
    if name in ("Subscriber", "SubscriberError"):
        from flame_client import subscriber

        return getattr(subscriber, name)
    raise AttributeError(f"module 'flame_client' has no attribute {name!r}")
