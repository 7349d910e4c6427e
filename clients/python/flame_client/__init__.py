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
from flame_client.subscriber import Subscriber, SubscriberError

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
