"""A Python client of metacenter that behaves like the Go gateway's.

    from metacenter.client import Client, AsyncClient, DnsNodes, MetacenterError, prompt_hashes

    client = Client(["http://10.0.0.5:8080", "http://10.0.0.6:8080"])
    client.add_request("llama3-70b", "r1", "10.0.0.1", prompt_length=1200)
    client.load("llama3-70b")   # [{"ip": "10.0.0.1", "queued_req_num": 1, ...}]

Calls about a cluster go to one node chosen by FNV-32a of the cluster name
over the sorted healthy nodes, fail over to the next nodes, and a circuit
breaker per node stops calling a node that keeps failing. See docs/client.md.

This package is a client: it imports nothing of the node (api, cluster,
runtime), only the gateway's prompt hashing.
"""

from metacenter.client.asynchronous import AsyncClient
from metacenter.client.blocking import Client
from metacenter.client.errors import MetacenterError, NodeUnavailable
from metacenter.client.nodes import DnsNodes
from metacenter.client.routing import fnv32a
from metacenter.core.hashing import prompt_hashes

__all__ = ["AsyncClient", "Client", "DnsNodes", "MetacenterError", "NodeUnavailable", "fnv32a", "prompt_hashes"]
