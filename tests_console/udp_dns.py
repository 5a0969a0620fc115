"""A small authoritative DNS server on loopback UDP for the console's tests
(the node tests' server runs in a Twisted reactor, which these tests lack).

    server = UdpDns().start()
    server.set_records("nodes.test", ["127.0.0.1", "::1"])   # A and AAAA
    server.address   # "127.0.0.1:PORT", the value of --dns-server
    server.stop()

Unknown names get NXDOMAIN; a known name without records of the asked type
an empty NOERROR answer.
"""

import ipaddress
import socket
import threading

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class UdpDns:
    def __init__(self):
        self.records = {}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stopping.set()
        self._thread.join()
        self.sock.close()

    def set_records(self, name, addresses):
        self.records[name.lower().rstrip(".")] = [ipaddress.ip_address(a) for a in addresses]

    def _serve(self):
        while not self._stopping.is_set():
            try:
                wire, client = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            self.sock.sendto(self._answer(dns.message.from_wire(wire)).to_wire(), client)

    def _answer(self, query):
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text().lower().rstrip(".")
        if name not in self.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        version = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(question.rdtype)
        matching = [str(a) for a in self.records[name] if a.version == version]
        if matching:
            response.answer.append(dns.rrset.from_text_list(
                question.name, 1, "IN", dns.rdatatype.to_text(question.rdtype), matching))
        return response
