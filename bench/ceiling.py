"""The ceiling of the stack: a bare ``twisted.web`` resource that answers
every request (any method, any path) with one fixed envelope.

It runs on the same reactor as the node (``twistd``'s default, epoll on
Linux), reads the request body like the node does, and like the node keeps no
access log. It does not parse POST bodies as HTML forms
(``parsePOSTFormSubmission=False``, a public ``Site`` argument): with it on,
twisted.web parses the Content-Type of every POST with the ``email`` package,
about 80 µs on the benchmark machine, work a JSON API never needs, so it is
no part of the ceiling. What it does not do either: routing, JSON parsing
and validation, state, metrics. The node's throughput divided by this server's,
measured with the same requests in the same run on the same core, is the
fraction of the stack's ceiling the node reaches.

    python -m bench.ceiling --port 8099 [--host 127.0.0.1]
"""

import argparse

from twisted.web import resource, server

# The size and shape of the node's answer to an add or a delete.
BODY = (b'{"status":"OK","error":null,"data":null,'
        b'"trace_id":"00000000-0000-0000-0000-000000000000"}')
CONTENT_TYPE = b"application/json; charset=utf-8"


class Fixed(resource.Resource):
    isLeaf = True

    def render(self, request):
        request.content.read()
        request.setHeader(b"Content-Type", CONTENT_TYPE)
        return BODY


class QuietSite(server.Site):
    def log(self, request):
        pass  # the node logs no access line by default either


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    reactor.listenTCP(args.port, QuietSite(Fixed(), parsePOSTFormSubmission=False), interface=args.host)
    reactor.run()


if __name__ == "__main__":
    main()
