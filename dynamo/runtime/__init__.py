"""The runtime: discovery, request and event planes behind one interface, two backends."""

from dynamo.runtime.planes import (
    Discovery,
    EventPlane,
    Handler,
    RequestContext,
    RequestPlane,
    ResponseStream,
    Subscription,
    WatchEvent,
)
from dynamo.runtime.runtime import Client, Endpoint, EndpointPath, Runtime, ServedEndpoint

__all__ = [
    "Client",
    "Discovery",
    "Endpoint",
    "EndpointPath",
    "EventPlane",
    "Handler",
    "RequestContext",
    "RequestPlane",
    "ResponseStream",
    "Runtime",
    "ServedEndpoint",
    "Subscription",
    "WatchEvent",
]
