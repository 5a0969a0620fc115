"""``BytesProducer``: an HTTP request body written in one go.

Shared by the node's peer client (``cluster/replication.py``) and the Python
client (``client/asynchronous.py``): twisted.web's ``FileBodyProducer`` (and
treq's default) spends a cooperator step, a reactor turn, per request.
"""

from twisted.internet import defer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


@implementer(IBodyProducer)
class BytesProducer:
    """``BytesProducer(body: bytes)``; ``length`` is ``len(body)``."""

    def __init__(self, body):
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass
